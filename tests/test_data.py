import collections
import json
from pathlib import Path

import pyarrow as pa
import pytest
from pydantic import ValidationError

from atspeed_ray.data.errors import DataError
from atspeed_ray.data.index import ItemIndex
from atspeed_ray.data.prepare import (
    SCHEMA, load_prepared, popularity_topk, prepare, sorted_code_tokens,
)
from atspeed_ray.data.release import Sample, load_release
from atspeed_ray.data.synthetic import SyntheticConfig, generate_synthetic, synthesize
from atspeed_ray.data.tokenizer import build_tokenizer, codes_to_token_ids
from atspeed_ray.metrics import recall_at_k

BEAUTY = Path(__file__).resolve().parents[2] / "shared" / "data" / "beauty"
if not BEAUTY.is_dir():
    BEAUTY = Path("/work/shared/data/beauty")

# ----------------------------------------------------------------------------- a tiny release
CODES = {i: [f"<a_{i % 3}>", f"<b_{i % 5}>", f"<c_{i}>"] for i in range(10)}
TRAIN = "1 0 1 2 3\n2 4 5\n3 6\n4\n"
VALID = "1 4 5\n2\n3 7\n4\n"
TEST = "1 6\n2 7 8\n3\n4 9\n"


def write_index(path: Path, codes: dict, name: str = "index.json") -> Path:
    """One item per line, so item i sits on line i + 2."""
    lines = [f'  "{k}": {json.dumps(v)}' for k, v in codes.items()]
    (path / name).write_text("{\n" + ",\n".join(lines) + "\n}\n")
    return path / name


def make_release(root: Path, train=TRAIN, valid=VALID, test=TEST, codes=CODES) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, text in (("train", train), ("valid", valid), ("test", test)):
        if text is not None:
            (root / f"sequential_{name}.txt").write_text(text)
    if codes is not None:
        write_index(root, codes)
    return root


def test_loader_follows_the_protocol(tmp_path):
    rel = load_release(make_release(tmp_path))
    assert rel.item_codes == CODES and rel.L == 3 and rel.item_id_offset == 0
    assert rel.train == {1: [0, 1, 2, 3], 2: [4, 5], 3: [6], 4: []}

    train, skipped = rel.samples("train", history_len=2)
    assert train == [
        Sample(1, [0], [1]), Sample(1, [0, 1], [2]), Sample(1, [1, 2], [3]), Sample(2, [4], [5]),
    ]
    assert skipped == {"users_without_train_items": 1, "users_with_single_train_item": 1}

    valid, skipped = rel.samples("valid", history_len=2)
    assert valid == [Sample(1, [2, 3], [4]), Sample(3, [6], [7])]  # first valid item only
    assert skipped == {"users_without_valid_items": 2, "users_without_history": 0}

    test, skipped = rel.samples("test", history_len=2)
    # history = (train + valid)[-2:], targets = all test items; user 4 has no history at all
    assert test == [Sample(1, [4, 5], [6]), Sample(2, [4, 5], [7, 8])]
    assert skipped == {"users_without_test_items": 1, "users_without_history": 1}

    test, _ = rel.samples("test", history_len=20)
    assert test[0] == Sample(1, [0, 1, 2, 3, 4, 5], [6])


def test_one_based_split_files_are_detected(tmp_path):
    shift = lambda text: "\n".join(  # noqa: E731
        " ".join([t[0], *(str(int(i) + 1) for i in t[1:])]) for t in (ln.split() for ln in text.splitlines())
    )
    root = make_release(tmp_path, shift(TRAIN), shift(VALID), shift(TEST))
    rel = load_release(root)
    assert rel.item_id_offset == -1 and rel.train[1] == [0, 1, 2, 3] and rel.test[4] == [9]
    with pytest.raises(DataError, match=r"sequential_test.txt:4: .*item 10 is not in the item index"):
        load_release(root, item_id_offset=0)


BAD_CASES = {
    # name: (file to overwrite, new content, expected message pieces)
    "non_integer": ("sequential_train.txt", "1 0 1\n2 4 x5\n", ["sequential_train.txt:2:", "'x5'"]),
    "junk_line": ("sequential_valid.txt", "1 4\n\n   @@  \n", ["sequential_valid.txt:3:", "'@@'"]),
    "negative": ("sequential_test.txt", "1 6\n2 -7\n", ["sequential_test.txt:2:", "'-7'"]),
    "duplicate_user": ("sequential_test.txt", "1 6\n2 7\n1 8\n",
                       ["sequential_test.txt:3:", "duplicate line for user 1"]),
    "missing_item": ("sequential_train.txt", "1 0 1\n2 4 5 42\n",
                     ["sequential_train.txt:2:", "item 42", "index.json"]),
    "empty_split": ("sequential_valid.txt", "1\n2\n3\n", ["sequential_valid.txt:1:", "no interactions"]),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_split_files(tmp_path, case):
    fname, text, pieces = BAD_CASES[case]
    root = make_release(tmp_path)
    (root / fname).write_text(text)
    with pytest.raises(DataError) as e:
        load_release(root)
    for p in pieces:
        assert p in str(e.value), (case, str(e.value))
    assert e.value.path.endswith(fname) and e.value.line is not None


def _bad_index(codes: dict) -> dict:
    return {**CODES, **codes}


BAD_JSON = {
    "wrong_length": (_bad_index({7: ["<a_1>", "<b_2>"]}),
                     ["index.json:9:", "item 7", "length 2", "item 0 has 3"]),
    "non_list": (_bad_index({3: "<a_0><b_3><c_3>"}), ["index.json:5:", "item 3", "list of strings"]),
    "bad_token": (_bad_index({4: ["<a_1>", "<b_x>", "<c_4>"]}), ["index.json:6:", "item 4", "<b_x>"]),
    "wrong_level": (_bad_index({5: ["<a_1>", "<c_2>", "<b_5>"]}), ["index.json:7:", "item 5", "level"]),
    "bad_key": ({**CODES, "x1": ["<a_1>", "<b_1>", "<c_1>"]}, ["index.json:12:", "'x1'"]),
}


@pytest.mark.parametrize("case", sorted(BAD_JSON))
def test_bad_index_json(tmp_path, case):
    codes, pieces = BAD_JSON[case]
    root = make_release(tmp_path, codes=codes)
    with pytest.raises(DataError) as e:
        load_release(root)
    for p in pieces:
        assert p in str(e.value), (case, str(e.value))


def test_bad_json_syntax_and_duplicate_keys(tmp_path):
    root = make_release(tmp_path)
    text = (root / "index.json").read_text()
    (root / "index.json").write_text(text.replace('"4": ', '"4" '))
    with pytest.raises(DataError, match=r"index.json:6: invalid JSON"):
        load_release(root)
    (root / "index.json").write_text(text.replace('"4": ', '"2": '))
    with pytest.raises(DataError, match=r"index.json:6: duplicate item id '2'"):
        load_release(root)
    (root / "index.json").write_text("[1, 2]")
    with pytest.raises(DataError, match=r"index.json:1: .*JSON object"):
        load_release(root)


def test_non_utf8_line(tmp_path):
    root = make_release(tmp_path)
    (root / "sequential_train.txt").write_bytes(b"1 0 1\n2 4\xff 5\n")
    with pytest.raises(DataError, match=r"sequential_train.txt:2: .*UTF-8"):
        load_release(root)


def test_missing_files(tmp_path):
    with pytest.raises(DataError, match="sequential_test.txt: missing split file"):
        load_release(make_release(tmp_path / "a", test=None))
    with pytest.raises(DataError, match="no \\*.json item index"):
        load_release(make_release(tmp_path / "b", codes=None))
    root = make_release(tmp_path / "c")
    write_index(root, CODES, "other.json")
    with pytest.raises(DataError, match="2 \\*.json files"):
        load_release(root)
    with pytest.raises(DataError, match="does not exist"):
        load_release(tmp_path / "nope")


# ----------------------------------------------------------------------------- synthetic data
SMALL = SyntheticConfig(num_users=300, seed=3)


def test_synthetic_is_deterministic_and_loadable(tmp_path):
    a, b = generate_synthetic(tmp_path / "a", SMALL), generate_synthetic(tmp_path / "b", SMALL)
    names = sorted(p.name for p in a.iterdir())
    assert names == [f"sequential_{s}.txt" for s in ("test", "train", "valid")] + ["synthetic.json"]
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes()
    c = generate_synthetic(tmp_path / "c", SMALL.model_copy(update={"seed": 4}))
    assert (c / "sequential_train.txt").read_bytes() != (a / "sequential_train.txt").read_bytes()

    rel = load_release(a)
    assert len(rel.item_codes) == SMALL.num_items and rel.L == 4
    assert len({tuple(v) for v in rel.item_codes.values()}) == SMALL.num_items  # unique IDs
    assert all(len(seq) >= 2 for seq in rel.train.values())
    for split in ("train", "valid", "test"):
        samples, _ = rel.samples(split)
        assert samples, split


def test_synthetic_structure():
    syn = synthesize(SMALL)
    assert syn.stats["users"] + syn.stats["dropped_users_lt2_train"] == SMALL.num_users
    # items of one cluster share their level-2 prefix, clusters share level-1 prefixes
    prefixes = collections.defaultdict(set)
    for item, k in syn.item_cluster.items():
        prefixes[k].add(tuple(syn.item_codes[item][:2]))
    assert all(len(p) == 1 for p in prefixes.values())
    level1 = collections.Counter(next(iter(p))[0] for p in prefixes.values())
    assert max(level1.values()) >= 2
    # time split: roughly 80/10/10 of the interactions
    n = {s: syn.stats[f"{s}_interactions"] for s in ("train", "valid", "test")}
    total = sum(n.values())
    assert 0.07 < n["valid"] / total < 0.13 and 0.07 < n["test"] / total < 0.13


def test_synthetic_config_validation():
    cfg = SyntheticConfig(L=3, codebook_sizes=[8, 8, 32], num_items=200, num_users=50)
    syn = synthesize(cfg)
    assert all(len(v) == 3 for v in syn.item_codes.values())
    assert SyntheticConfig(L=3).codebook_sizes == [16, 16, 16]
    with pytest.raises(ValidationError, match="codebook_sizes"):
        SyntheticConfig(L=3, codebook_sizes=[16, 16, 16, 16])
    with pytest.raises(ValidationError, match="do not fit"):
        SyntheticConfig(num_items=5000, codebook_sizes=[4, 4, 4, 4])


# ----------------------------------------------------------------------------- prepare
@pytest.fixture(scope="module")
def prepared_synthetic(tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    summary = prepare("synthetic", out)
    return summary, load_prepared(out)


def test_prepare_writes_the_schema_and_prompts_decode(prepared_synthetic):
    summary, p = prepared_synthetic
    assert summary["items"] == 600 and summary["L"] == 4 and summary["collision_groups"] == 0
    assert summary["vocab_size"] == len(p.tokenizer) == 5 + 4 * 16
    assert summary["synthetic"]["stats"]["dropped_users_lt2_train"] >= 0
    assert json.loads((p.root / "summary.json").read_text()) == summary
    assert json.loads((p.root / "index.json").read_text()) == {str(k): v for k, v in p.item_codes.items()}
    rel = load_release(p.root / "raw")
    for split in ("train", "valid", "test"):
        t = p.table(split)
        assert t.schema == SCHEMA and t.num_rows == summary["samples"][split]
        assert sum(summary["skipped"][split].values()) >= 0
    assert summary["samples"]["train"] == sum(len(s) - 1 for s in rel.train.values())

    tok = p.tokenizer
    for prompt, hist, targets, tcodes in zip(
        p.prompts("test", 20), p.histories("test", 20), p.targets("test", 20),
        p.table("test").slice(0, 20).column("target_codes").to_pylist(),
    ):
        expected = [tok.bos_token] + [c for i in hist for c in [*p.item_codes[i], tok.sep_token]]
        assert tok.convert_ids_to_tokens(prompt) == expected
        assert tok.convert_ids_to_tokens(tcodes) == p.item_codes[targets[0]]
        assert p.index.codes_of([targets[0]]).tolist()[0] == tcodes
    assert len(p.prompts("valid", limit=3)) == 3


def test_load_prepared_rejects_other_folders(tmp_path):
    with pytest.raises(DataError, match="not a prepared data folder .*summary.json"):
        load_prepared(tmp_path)


def test_popularity_counts_train_interactions(prepared_synthetic):
    _, p = prepared_synthetic
    rel = load_release(p.root / "raw")
    counts = collections.Counter(i for seq in rel.train.values() for i in seq)
    expected = [i for i, _ in sorted(counts.items(), key=lambda x: (-x[1], x[0]))[:25]]
    assert popularity_topk(p, 25) == expected


def markov_rankings(p, split: str, k: int) -> list[list[int]]:
    """Most frequent next items after the last history item's level-2 prefix (train transitions),
    unseen items only, padded with popularity."""
    prefix = lambda i: tuple(p.item_codes[i][:2])  # noqa: E731
    nxt = collections.defaultdict(collections.Counter)
    for h, t in zip(p.histories("train"), p.targets("train")):
        nxt[prefix(h[-1])][t[0]] += 1
    pop = popularity_topk(p, 100)
    out = []
    for h in p.histories(split):
        seen = set(h)
        counts = sorted(nxt[prefix(h[-1])].items(), key=lambda x: (-x[1], x[0]))
        ranked = [i for i, _ in counts if i not in seen]
        out.append((ranked + [i for i in pop if i not in seen and i not in ranked])[:k])
    return out


def test_synthetic_has_structure_beyond_popularity(prepared_synthetic):
    _, p = prepared_synthetic
    targets = p.targets("valid")
    pop = recall_at_k([popularity_topk(p, 10)] * len(targets), targets, 10)
    markov = recall_at_k(markov_rankings(p, "valid", 10), targets, 10)
    assert markov > 0.4 and markov > 3 * pop, (markov, pop)


def test_prepare_from_release_folder(tmp_path):
    summary = prepare(make_release(tmp_path / "rel"), tmp_path / "out", history_len=2)
    assert summary["samples"] == {"train": 4, "valid": 2, "test": 2}
    assert summary["skipped"]["train"]["users_with_single_train_item"] == 1
    p = load_prepared(tmp_path / "out")
    assert p.histories("test") == [[4, 5], [4, 5]] and p.targets("test") == [[6], [7, 8]]
    assert isinstance(p.table("train"), pa.Table)
    with pytest.raises(ValueError, match="synthetic"):
        prepare(tmp_path / "rel", tmp_path / "out2", synthetic=SyntheticConfig())


# ----------------------------------------------------------------------------- the real data
@pytest.mark.skipif(not BEAUTY.is_dir(), reason="Beauty data not present")
def test_beauty_release():
    rel = load_release(BEAUTY)
    assert len(rel.item_codes) == 12035 and rel.L == 4
    # the split files are 1-based (items 1..12035), the index 0-based (keys 0..12034)
    assert rel.item_id_offset == -1
    assert len(rel.users) == 19383
    assert [rel.num_interactions(s) for s in ("train", "valid", "test")] == [122241, 9316, 7313]

    tok = build_tokenizer(sorted_code_tokens(rel.item_codes))
    assert len(tok) == 5 + 91 + 256 + 256 + 256
    index = ItemIndex.from_codes(codes_to_token_ids(tok, rel.item_codes))
    # 9 code tuples are shared: 7 pairs, one triple, one group of 4 (21 items)
    assert len(index.collisions) == 9
    assert sorted(len(g) for g in index.collisions) == [2] * 7 + [3, 4]

    train, skipped = rel.samples("train")
    assert len(train) == sum(len(s) - 1 for s in rel.train.values()) == 102858
    assert skipped == {"users_without_train_items": 0, "users_with_single_train_item": 0}
    assert len(rel.samples("valid")[0]) == 4295 and len(rel.samples("test")[0]) == 3553

    # with the right id mapping, consecutive items share the level-1 code far above chance (~1/91)
    pairs = [(a, b) for s in rel.train.values() for a, b in zip(s, s[1:])]
    same = sum(rel.item_codes[a][0] == rel.item_codes[b][0] for a, b in pairs) / len(pairs)
    assert same > 0.1
