"""Loader for the AtSpeed / LC-Rec release format.

A release is a folder with

* ``sequential_train.txt``, ``sequential_valid.txt``, ``sequential_test.txt``: one line per user,
  ``user_id item_id item_id ...`` in time order; a line with only the user id means no items in that
  split. Blank lines are ignored.
* exactly one ``*.json`` index: ``{"item_id": ["<a_47>", "<b_103>", "<c_234>", "<d_99>"], ...}``.

Every problem with the files raises ``DataError`` naming the file and the 1-based line.

Evaluation protocol (the paper's): ``Release.samples(split)``

* train: for every position i >= 1 of a user's train sequence, history = items before i (last
  ``history_len``), target = item i.
* valid: history = all train items (last ``history_len``), target = the first validation item.
* test:  history = train + valid items (last ``history_len``), targets = all the user's test items.

Users that give no sample are counted in the returned ``skipped`` dict, never dropped silently.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from atspeed_ray.data.errors import DataError

SPLITS = ("train", "valid", "test")
SPLIT_FILES = {s: f"sequential_{s}.txt" for s in SPLITS}
CODE_RE = re.compile(r"<([a-z])_(\d+)>")


@dataclass
class Sample:
    user: int
    history: list[int]  # item ids, oldest first, at most history_len
    targets: list[int]  # one item for train/valid, all test items for test


@dataclass
class Release:
    path: Path
    item_codes: dict[int, list[str]]  # item -> L code strings
    train: dict[int, list[int]]  # user -> items in time order (possibly empty)
    valid: dict[int, list[int]]
    test: dict[int, list[int]]
    index_file: Path = field(default=Path())
    item_id_offset: int = 0  # added to the split files' item ids to get index keys (-1: 1-based files)

    @property
    def L(self) -> int:
        return len(next(iter(self.item_codes.values())))

    @property
    def users(self) -> list[int]:
        return sorted(set(self.train) | set(self.valid) | set(self.test))

    def split(self, name: str) -> dict[int, list[int]]:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {SPLITS}")
        return getattr(self, name)

    def num_interactions(self, name: str) -> int:
        return sum(len(v) for v in self.split(name).values())

    def samples(self, split: str, history_len: int = 20) -> tuple[list[Sample], dict[str, int]]:
        """The evaluation samples of ``split`` and the number of users skipped, by reason."""
        if history_len < 1:
            raise ValueError(f"history_len must be >= 1, got {history_len}")
        self.split(split)  # validates the name
        out: list[Sample] = []
        h = history_len
        if split == "train":
            skipped = {"users_without_train_items": 0, "users_with_single_train_item": 0}
            for u in self.users:
                seq = self.train.get(u, [])
                if len(seq) < 2:
                    reason = "users_with_single_train_item" if seq else "users_without_train_items"
                    skipped[reason] += 1
                    continue
                out.extend(Sample(u, seq[max(0, i - h):i], [seq[i]]) for i in range(1, len(seq)))
        elif split == "valid":
            skipped = {"users_without_valid_items": 0, "users_without_history": 0}
            for u in self.users:
                items, hist = self.valid.get(u, []), self.train.get(u, [])[-h:]
                if not items:
                    skipped["users_without_valid_items"] += 1
                elif not hist:
                    skipped["users_without_history"] += 1
                else:
                    out.append(Sample(u, hist, [items[0]]))
        else:
            skipped = {"users_without_test_items": 0, "users_without_history": 0}
            for u in self.users:
                items = self.test.get(u, [])
                hist = (self.train.get(u, []) + self.valid.get(u, []))[-h:]
                if not items:
                    skipped["users_without_test_items"] += 1
                elif not hist:
                    skipped["users_without_history"] += 1
                else:
                    out.append(Sample(u, hist, list(items)))
        return out, skipped


# ---------------------------------------------------------------------------------- parsing
def parse_code(token: str) -> tuple[int, int]:
    """``"<b_103>"`` -> (level 1, code 103); ValueError if it is not a code token."""
    m = CODE_RE.fullmatch(token)
    if m is None:
        raise ValueError(f"not a code token: {token!r}")
    return ord(m.group(1)) - ord("a"), int(m.group(2))


def _key_line(text: str, key: str, nth: int = 0) -> int | None:
    """1-based line of the ``nth`` occurrence of ``"key":`` in raw JSON text (None if not found)."""
    for n, m in enumerate(re.finditer(r'"%s"\s*:' % re.escape(key), text)):
        if n == nth:
            return text.count("\n", 0, m.start()) + 1
    return None


def read_index_json(path: str | Path) -> dict[int, list[str]]:
    """Read and validate ``{"item_id": ["<a_1>", "<b_2>", ...]}``: same length, level letters in order."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read item index: {e}", path) from None

    def no_dupes(pairs: list[tuple[str, object]]) -> dict:
        seen: dict[str, object] = {}
        for k, v in pairs:
            if k in seen:
                raise DataError(f"duplicate item id {k!r}", path, _key_line(text, k, nth=1))
            seen[k] = v
        return seen

    try:
        raw = json.loads(text, object_pairs_hook=no_dupes)
    except json.JSONDecodeError as e:
        raise DataError(f"invalid JSON: {e.msg} (column {e.colno})", path, e.lineno) from None
    if not isinstance(raw, dict):
        raise DataError(f"item index must be a JSON object, got {type(raw).__name__}", path, 1)
    if not raw:
        raise DataError("item index is empty", path, 1)
    codes: dict[int, list[str]] = {}
    L: int | None = None
    first_item: str | None = None
    for key, value in raw.items():
        where = lambda: _key_line(text, key)  # noqa: E731  (only computed on error)
        if not (key.isascii() and key.isdigit()):
            raise DataError(f"item id {key!r} is not a non-negative integer", path, where())
        item = int(key)
        if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
            raise DataError(f"item {key}: semantic ID must be a list of strings, got {value!r}",
                            path, where())
        if not value:
            raise DataError(f"item {key}: empty semantic ID", path, where())
        if L is None:
            L, first_item = len(value), key
        elif len(value) != L:
            raise DataError(
                f"item {key}: semantic ID has length {len(value)}, but item {first_item} has {L}",
                path, where(),
            )
        for pos, c in enumerate(value):
            try:
                level, _ = parse_code(c)
            except ValueError as e:
                raise DataError(f"item {key}: {e} (expected like '<a_12>')", path, where()) from None
            if level != pos:
                raise DataError(f"item {key}: code {c!r} at position {pos} has the wrong level letter",
                                path, where())
        codes[item] = value
    return codes


def read_split(path: str | Path, name: str | None = None) -> dict[int, list[int]]:
    """Read ``user item item ...`` lines -> {user: [items]}; blank lines are ignored."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"missing split file {path.name}", path)
    out: dict[int, list[int]] = {}
    seen_line: dict[int, int] = {}
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                toks = raw.decode().split()
            except UnicodeDecodeError:
                raise DataError("line is not valid UTF-8 text", path, lineno) from None
            if not toks:
                continue
            bad = next((t for t in toks if not (t.isascii() and t.isdigit())), None)
            if bad is not None:
                raise DataError(f"invalid token {bad!r}: ids must be non-negative integers", path, lineno)
            ids = [int(t) for t in toks]
            user = ids[0]
            if user in out:
                raise DataError(f"duplicate line for user {user} (first on line {seen_line[user]})",
                                path, lineno)
            out[user], seen_line[user] = ids[1:], lineno
    if not any(out.values()):
        raise DataError(f"split {name or path.name} has no interactions ({len(out)} users, all empty)",
                        path, 1)
    return out


def _check_items(path: Path, seqs: dict[int, list[int]], codes: dict[int, list[str]], index: Path,
                 offset: int = 0) -> None:
    missing = [(u, i) for u, items in seqs.items() for i in items if i + offset not in codes]
    if not missing:
        return
    user, item = missing[0]
    lineno = None  # re-scan to find the line: only on error
    with path.open() as f:
        for n, line in enumerate(f, 1):
            toks = line.split()
            if toks and int(toks[0]) == user:
                lineno = n
                break
    more = f" ({len(missing)} occurrences in this file)" if len(missing) > 1 else ""
    shift = f" (item ids shifted by {offset})" if offset else ""
    raise DataError(f"user {user}: item {item} is not in the item index {index.name}{shift}{more}",
                    path, lineno)


def detect_item_id_offset(codes: dict[int, list[str]], splits: dict[str, dict[int, list[int]]]) -> int:
    """0 if every split item is an index key; -1 if the split files are 1-based against a 0-based index.

    The paper's Beauty release is the second case: its index keys are 0..N-1 while the split files
    use 1..N (N = 12035 appears in sequential_train.txt, 0 appears nowhere). Shifting by -1 is also
    what makes consecutive items share ID prefixes far more often than chance. Anything else is
    left at 0, and missing items then raise a DataError.
    """
    used = {i for seqs in splits.values() for items in seqs.values() for i in items}
    if used <= codes.keys():
        return 0
    n = len(codes)
    if min(used) >= 1 and max(used) == n and codes.keys() == set(range(n)):
        return -1
    return 0


def find_index_json(path: str | Path) -> Path:
    path = Path(path)
    found = sorted(path.glob("*.json"))
    if len(found) != 1:
        if not found:
            raise DataError("no *.json item index", path)
        names = ", ".join(p.name for p in found)
        raise DataError(f"{len(found)} *.json files ({names}); expected exactly one item index", path)
    return found[0]


def load_release(path: str | Path, item_id_offset: int | None = None) -> Release:
    """Load and validate a release folder (see module docstring).

    Item ids in the returned release are index keys. ``item_id_offset`` is added to the split files'
    item ids to get them; ``None`` detects it (see ``detect_item_id_offset``).
    """
    path = Path(path)
    if not path.is_dir():
        raise DataError("release folder does not exist", path)
    for s in SPLITS:
        if not (path / SPLIT_FILES[s]).is_file():
            raise DataError(f"missing split file {SPLIT_FILES[s]}", path / SPLIT_FILES[s])
    index_file = find_index_json(path)
    codes = read_index_json(index_file)
    splits = {s: read_split(path / SPLIT_FILES[s], s) for s in SPLITS}
    offset = detect_item_id_offset(codes, splits) if item_id_offset is None else item_id_offset
    for s in SPLITS:
        _check_items(path / SPLIT_FILES[s], splits[s], codes, index_file, offset)
        if offset:
            splits[s] = {u: [i + offset for i in items] for u, items in splits[s].items()}
    return Release(path, codes, splits["train"], splits["valid"], splits["test"], index_file, offset)


def write_release(
    out_dir: str | Path,
    item_codes: dict[int, list[str]],
    train: dict[int, list[int]],
    valid: dict[int, list[int]],
    test: dict[int, list[int]],
    index_name: str = "index.json",
) -> Path:
    """Write the release format (one line per user in every split, users sorted)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    others = [p.name for p in out.glob("*.json") if p.name != index_name]
    if others:
        raise FileExistsError(f"{out} already holds other *.json files {others}; a release has one index")
    users = sorted(set(train) | set(valid) | set(test))
    for name, seqs in (("train", train), ("valid", valid), ("test", test)):
        lines = (" ".join(map(str, [u, *seqs.get(u, [])])) for u in users)
        (out / SPLIT_FILES[name]).write_text("".join(line + "\n" for line in lines))
    with (out / index_name).open("w") as f:
        json.dump({str(i): item_codes[i] for i in sorted(item_codes)}, f)
    return out
