"""The whole pipeline as one job: prepare -> train target -> teacher data -> align drafts (the
LM drafts, then a feature draft if configured) -> evaluate (-> serve). ``jobs/demo.py`` runs it on the built-in synthetic data, ``jobs/reproduce.py``
on a paper-format data set. Each stage is skipped when its output already exists, so a second run
reuses the first one's work. Every stage is the same CLI command a user would type, run as its
own process: its stdout (stage lines, progress, tables) comes to the terminal, its stderr (Ray's,
DeepSpeed's and the other libraries' logs, and its error messages) goes to ``logs/<command>.log``
in the run folder (see ``StageOutput``)."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

from atspeed_ray.report import below_references, command_text, results_screen, wrap_line
from atspeed_ray.settings import LossName
from atspeed_ray.width_policy import Width


VERBOSE_ENV = "ATSPEED_VERBOSE"
# how the drafts are made (``PipelineConfig.draft_recipe``)
DraftRecipe = Literal["teacher", "sft-then-align"]
TEACHER_RECIPE, SFT_THEN_ALIGN = get_args(DraftRecipe)


def env_verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no")


class StageSettings(BaseModel):
    """Flags of one training stage; None = the command's own default (the flag is not passed)."""

    model_config = ConfigDict(extra="forbid")

    epochs: int | None = Field(None, ge=1)
    micro_batch: int | None = Field(None, ge=1)
    lr: float | None = Field(None, gt=0.0)
    max_samples: int | None = Field(None, ge=1)  # subsample the training rows
    workers: int | None = Field(None, ge=0)  # Ray Train workers (0 = in-process)
    extra: list[str] = []  # more CLI flags, passed as is


class PipelineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data: str = "synthetic"  # "synthetic" or a release folder
    out: str = "demo_out"
    preset: str = "tiny"
    # a pretrained LLM: a folder, or a bundled name (smollm2), which a first stage writes to
    # OUT/base-model (`atspeed-ray base-model NAME`); then prepare --base-model, train-target --init
    base_model: str | None = None
    prompt_template: str | None = None  # with base_model; None: prepare's default
    history_len: int | None = None  # items per prompt (prepare --history-len); None: its default
    target: StageSettings = StageSettings()
    align: StageSettings = StageSettings()
    teacher_k: int = 10
    teacher_samples: int | None = None  # subsample train prompts for teacher data
    teacher_workers: int | None = None  # None: the teacher command's default
    teacher_extra: list[str] = []  # more teacher flags, passed as is
    losses: list[LossName] = ["sft", "atspeed-s", "atspeed-r"]
    # how the drafts are made. "teacher": every loss from the same start (a fresh preset draft,
    # or the target's first layers), trained on the teacher data. "sft-then-align": the sft draft
    # first, on the training data without the teacher (`sft` stage settings), then every other
    # loss starts from it (--init) and is aligned on the teacher data (`align` settings); a
    # draft cut from an LLM over-fits a small teacher set when aligned from the cut alone.
    draft_recipe: DraftRecipe = TEACHER_RECIPE
    sft: StageSettings = StageSettings()  # the sft stage of "sft-then-align"
    alpha: float | None = None  # None: the align command's default
    # a feature draft (a head on the target's hidden states, ``align --draft-kind feature``, on
    # the target's own top teacher_k) made after the LM drafts and evaluated beside them, in
    # drafts/feature; None: no feature draft
    feature: StageSettings | None = None
    eval_k: list[int] = [1, 5, 10]
    eval_prompts: int | None = None
    timing_prompts: int = 30
    # evaluate --draft-beams: N, a multiple of K such as "2k", auto, or per code position
    # "2k/8k/2k" (``width_policy.WidthPolicy``); None: the evaluate command's default
    draft_beams: Width | None = None
    draft_init_layers: int | None = None  # drafts start from the target's first N layers (align --init-layers)
    gamma: int | None = None  # None: the evaluate command's default
    eval_extra: list[str] = []  # more evaluate flags, passed as is
    use_gpu: bool = False
    verbose: bool = Field(default_factory=env_verbose)  # library logs on the terminal too


STAGE_TIMES = "stage_times.json"  # in the pipeline's work folder
EXAMPLE_ITEMS = 8  # the demo's example request: the last items of a test history
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")  # CSI (colours, cursor) and OSC


# Ray prefixes what its workers print with where it came from: "(RayTrainWorker pid=12, ip=..)"
# for a worker, "(raylet)" / "(autoscaler +1s)" for its own notices
RAY_WORKER_PREFIX = re.compile(r"^\((?:[\w.:-]+ )?pid=\d+(?:, ip=[^)]*)?\) ")
RAY_NOTICE = re.compile(r"^\((?:raylet|autoscaler|pid=raylet|pid=autoscaler)[^)]*\)")


def strip_ansi(text: str) -> str:
    """``text`` without terminal escape sequences (colours, cursor moves, titles)."""
    return ANSI_ESCAPE.sub("", text)


def screen_line(line: str) -> str | None:
    """A line a command printed, as the terminal shows it: without colour codes and without
    Ray's worker prefix; None for Ray's own notices (they go to the command's log)."""
    plain = strip_ansi(line.rstrip("\n"))
    if RAY_NOTICE.match(plain):
        return None
    return RAY_WORKER_PREFIX.sub("", plain)


@dataclass(frozen=True)
class StageOutput:
    """Where the stages' output goes. An ``atspeed-ray`` command writes its own report to stdout
    and everything else to stderr; the terminal gets stdout, ``logs/<command>.log`` gets stderr
    (appended, one header line per run), or the terminal gets both when ``verbose``."""

    logs: Path
    verbose: bool = False
    times: Path | None = None  # stage_times.json: every finished command and its seconds (appended)

    def announce(self) -> None:
        if not self.verbose:
            print(wrap_line(f"logs of Ray, DeepSpeed and the other libraries: {self.logs}/ "
                            f"(--verbose or {VERBOSE_ENV}=1 prints them here)"), flush=True)

    def path(self, command: str) -> Path:
        return self.logs / f"{command}.log"

    @contextmanager
    def stderr(self, argv: list[str]) -> Iterator[IO[str] | None]:
        """The file a command's stderr goes to (None: this process's stderr). The libraries
        colour some lines (Ray's worker prefixes) whether or not they write to a terminal: the
        log's colour codes are removed when the command ends."""
        if self.verbose:
            yield None
            return
        self.logs.mkdir(parents=True, exist_ok=True)
        path = self.path(argv[0])
        try:
            with open(path, "a") as f:
                f.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} $ atspeed-ray {shlex.join(argv)}\n")
                f.flush()
                yield f
        finally:
            text = path.read_text(errors="replace")
            plain = strip_ansi(text)
            if plain != text:
                path.write_text(plain)

    def failure(self, argv: list[str], rc: int, lines: int = 30) -> str:
        """The message for a failed command: with the end of its log when that is not on screen."""
        msg = f"stage failed (exit {rc}): atspeed-ray {shlex.join(argv)}"
        if self.verbose:
            return msg
        tail = self.path(argv[0]).read_text(errors="replace").splitlines()[-lines:]
        return "\n".join([msg, f"last lines of {self.path(argv[0])}:", *tail])

    def record(self, argv: list[str], seconds: float) -> None:
        """Append a finished command to ``times`` (a resumed pipeline keeps the earlier runs')."""
        if self.times is None:
            return
        rows = json.loads(self.times.read_text()) if self.times.exists() else []
        rows.append({"command": shlex.join(["atspeed-ray", *argv]), "seconds": round(seconds, 1),
                     "finished": time.strftime("%Y-%m-%d %H:%M:%S")})
        self.times.write_text(json.dumps(rows, indent=2))


def cli_process(argv: list[str], stderr: IO[str] | None, **kw) -> subprocess.Popen:
    """``atspeed-ray ARGV`` as a child process running this same ``atspeed_ray`` package."""
    import atspeed_ray

    root = str(Path(atspeed_ray.__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    return subprocess.Popen([sys.executable, "-m", "atspeed_ray.cli", *argv], stderr=stderr, env=env, **kw)


def relayed(argv: list[str], err: IO[str] | None, **kw) -> subprocess.Popen:
    """``cli_process`` with its stdout read here line by line (``relay``)."""
    return cli_process(argv, err, stdout=subprocess.PIPE, text=True, errors="replace", bufsize=1,
                       **kw)


def relay(proc: subprocess.Popen, err: IO[str] | None) -> None:
    """Print a child's stdout as ``screen_line`` shows it, a line longer than the screen wrapped
    at its spaces (``wrap_line``: an epoch's metrics, a data summary); Ray's notices go to
    ``err`` (its log; the terminal's stderr when None) until the child closes its stdout."""
    assert proc.stdout is not None
    for line in proc.stdout:
        shown = screen_line(line)
        if shown is not None:
            print(wrap_line(shown), flush=True)
        else:
            print(strip_ansi(line.rstrip("\n")), file=err or sys.stderr, flush=True)


def wait_child(proc: subprocess.Popen, err: IO[str] | None = None) -> int:
    """The child's exit code, its stdout relayed (``relay``) when it was started by ``relayed``."""
    try:
        if proc.stdout is not None:
            relay(proc, err)
        return proc.wait()
    except KeyboardInterrupt:  # the child got the same Ctrl-C: give it time to shut Ray down
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise


def run_cli(argv: list[str], output: StageOutput) -> None:
    """Run one ``atspeed-ray`` command as a child process; stop the pipeline if it fails."""
    print("\n" + command_text(["atspeed-ray", *argv]), flush=True)
    t0 = time.perf_counter()
    with output.stderr(argv) as err:
        rc = wait_child(relayed(argv, err), err)
    if rc:
        raise SystemExit(output.failure(argv, rc))
    seconds = time.perf_counter() - t0
    output.record(argv, seconds)
    print(f"[{argv[0]} done in {seconds:.1f} s]", flush=True)


def flags(**values: object) -> list[str]:
    """``--name value`` for each value that is set (None: leave the command's default)."""
    out: list[str] = []
    for name, value in values.items():
        if value is not None:
            out += ["--" + name.replace("_", "-"), str(value)]
    return out


def stage_flags(s: StageSettings, use_gpu: bool) -> list[str]:
    out = flags(epochs=s.epochs, micro_batch=s.micro_batch, lr=s.lr, workers=s.workers,
                max_samples=s.max_samples)
    if use_gpu:
        out += ["--use-gpu"]
    return out + list(s.extra)


def done(path: Path, marker: str) -> bool:
    if (path / marker).exists():
        print(f"\n= reusing {path} (found {marker})", flush=True)
        return True
    return False


def bundled_base_model(cfg: PipelineConfig) -> bool:
    """Whether ``cfg.base_model`` names a bundled model rather than a folder."""
    from atspeed_ray.base_model import BUNDLED

    return cfg.base_model in BUNDLED and not Path(cfg.base_model).exists()


def base_model_stage(cfg: PipelineConfig, out: Path, output: StageOutput) -> PipelineConfig:
    """A bundled ``base_model`` (smollm2) is written to OUT/base-model first; the later stages
    get that folder."""
    if cfg.base_model is None or not bundled_base_model(cfg):
        return cfg
    folder = out / "base-model"
    if not done(folder, "config.json"):
        run_cli(["base-model", cfg.base_model, "--out", str(folder)], output)
    return cfg.model_copy(update={"base_model": str(folder)})


def prepare_argv(cfg: PipelineConfig, data: Path) -> list[str]:
    return (["prepare", "--data", cfg.data, "--out", str(data)]
            + flags(base_model=cfg.base_model, prompt_template=cfg.prompt_template,
                    history_len=cfg.history_len))


def target_argv(cfg: PipelineConfig, data: Path, target: Path) -> list[str]:
    """train-target: fine-tunes ``cfg.base_model`` when given, else a fresh ``cfg.preset`` model."""
    model = ["--init", cfg.base_model] if cfg.base_model else ["--preset", cfg.preset]
    return (["train-target", "--data", str(data), "--out", str(target), *model]
            + stage_flags(cfg.target, cfg.use_gpu))


def draft_order(cfg: PipelineConfig) -> list[str]:
    """The losses in the order their drafts are made: "sft-then-align" makes sft first."""
    if cfg.draft_recipe == TEACHER_RECIPE:
        return list(cfg.losses)
    return ["sft"] + [x for x in cfg.losses if x != "sft"]


def align_argv(cfg: PipelineConfig, data: Path, target: Path, teacher: Path, draft: Path
               ) -> list[str]:
    """align for the draft ``draft`` (its folder name is the loss), following ``draft_recipe``:
    "sft-then-align" trains its sft draft on the training data (``sft`` settings) and starts
    every other loss from that draft; otherwise each starts fresh (or cut) on the teacher data."""
    loss = draft.name
    two_step = cfg.draft_recipe == SFT_THEN_ALIGN
    first = two_step and loss == "sft"
    start = (["--init", str(draft.parent / "sft")] if two_step and not first
             else ["--preset", cfg.preset] + flags(init_layers=cfg.draft_init_layers or None))
    return (["align", "--data", str(data), "--target", str(target), "--out", str(draft),
             "--loss", loss] + flags(alpha=cfg.alpha)
            + ([] if first else ["--teacher", str(teacher)]) + start
            + stage_flags(cfg.sft if first else cfg.align, cfg.use_gpu))


def evaluate_argv(cfg: PipelineConfig, data: Path, target: Path, evaluation: Path,
                  drafts: list[Path]) -> list[str]:
    """evaluate of every draft (any kind) on the same prompts, into ``evaluation``."""
    argv = ["evaluate", "--data", str(data), "--target", str(target), "--out", str(evaluation),
            "--k", ",".join(map(str, cfg.eval_k))]
    argv += flags(timing_prompts=cfg.timing_prompts, gamma=cfg.gamma,
                  num_prompts=cfg.eval_prompts, draft_beams=cfg.draft_beams)
    for d in drafts:
        argv += ["--draft", str(d)]
    return argv + list(cfg.eval_extra)


FEATURE_DRAFT = "feature"  # the feature draft's folder under drafts/ (its method name)


def feature_argv(cfg: PipelineConfig, data: Path, target: Path, draft: Path) -> list[str]:
    """align for the feature draft: trained on the target's own top ``teacher_k`` beam search
    (no teacher data folder), with the ``feature`` stage settings."""
    assert cfg.feature is not None
    return (["align", "--data", str(data), "--target", str(target), "--out", str(draft),
             "--draft-kind", "feature"] + flags(teacher_k=cfg.teacher_k)
            + stage_flags(cfg.feature, cfg.use_gpu))


def run_pipeline(cfg: PipelineConfig) -> Path:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pipeline.json").write_text(cfg.model_dump_json(indent=2))
    data, target, teacher = out / "data", out / "target", out / "teacher"
    output = StageOutput(out / "logs", cfg.verbose, times=out / STAGE_TIMES)
    output.announce()
    t0 = time.perf_counter()
    cfg = base_model_stage(cfg, out, output)
    if not done(data, "summary.json"):
        run_cli(prepare_argv(cfg, data), output)
    if not done(target, "config.json"):
        run_cli(target_argv(cfg, data, target), output)
    if not done(teacher, "teacher.json"):
        argv = ["teacher", "--data", str(data), "--target", str(target), "--out", str(teacher)]
        argv += flags(k=cfg.teacher_k, workers=cfg.teacher_workers, max_samples=cfg.teacher_samples)
        run_cli(argv + (["--use-gpu"] if cfg.use_gpu else []) + list(cfg.teacher_extra), output)
    for loss in draft_order(cfg):
        draft = out / "drafts" / loss
        if not done(draft, "config.json"):
            run_cli(align_argv(cfg, data, target, teacher, draft), output)
    drafts = [out / "drafts" / loss for loss in cfg.losses]  # evaluated in the configured order
    if cfg.feature is not None:
        drafts.append(out / "drafts" / FEATURE_DRAFT)
        if not done(drafts[-1], "config.json"):
            run_cli(feature_argv(cfg, data, target, drafts[-1]), output)
    evaluation = out / "eval"
    if not done(evaluation, "speed.json"):
        run_cli(evaluate_argv(cfg, data, target, evaluation, drafts), output)
    else:  # evaluate printed them when it ran
        print("\n" + results_screen(evaluation), flush=True)
    summary = json.loads((data / "summary.json").read_text())
    note = accuracy_note(cfg, json.loads((evaluation / "accuracy.json").read_text()), summary)
    if note:
        print("\n" + wrap_line(note), flush=True)
    print(f"\npipeline finished in {time.perf_counter() - t0:.0f} s: {summary['users']} users, "
          f"{summary['items']} items; outputs in {out}/", flush=True)
    return out


def accuracy_note(cfg: PipelineConfig, accuracy: list[dict], summary: dict) -> str | None:
    """A note when the target's Recall@K is below a reference recommender's: what the references
    are and, on synthetic data, why (its generative story, ``atspeed_ray.data.synthetic``, with
    the probabilities ``prepare`` recorded in ``summary``); None when the target is not below."""
    from atspeed_ray.reference.config import REFERENCE_METHODS

    below = below_references(accuracy, REFERENCE_METHODS)
    if below is None:
        return None
    note = (f"note: the target ({below}) is below the reference recommenders, yardsticks fitted "
            f"on the same train sequences (transition: which item followed which; sasrec: a "
            f"self-attention model over item ids), not the product")
    if "synthetic" not in summary:
        return note + "."
    from atspeed_ray.data.synthetic import SyntheticConfig

    syn = SyntheticConfig(**summary["synthetic"]["config"])  # what prepare generated
    n = cfg.target.epochs
    epochs = f"{n} epoch{'' if n == 1 else 's'}" if n else "its default epochs"
    model = f"the {cfg.preset} target" if cfg.base_model is None else "the target"
    return (note + f". The synthetic data is first-order: the next item is in the previous "
            f"item's cluster {syn.stay_prob:.0%} of the time, and its fixed successor "
            f"{syn.stay_prob * syn.successor_prob:.0%} of the time, a rule a transition table "
            f"counts exactly from the train pairs, while {model} learns it through "
            f"{summary['L']}-token item IDs in {epochs}.")


def serve_demo(out: Path, draft: str = "atspeed-s", port: int = 8000, wait: bool | None = None,
               verbose: bool = False) -> None:
    """Start the endpoint on the pipeline's target and draft, send one example request, print it
    as a curl line. With ``wait`` (default: when stdin is a terminal) keep serving until Ctrl-C.
    The server's stderr (Ray Serve's logs) goes to ``logs/serve.log`` like the stages'."""
    import httpx

    from atspeed_ray.data.prepare import load_prepared

    history = load_prepared(out / "data").histories("test", limit=1)[0][-EXAMPLE_ITEMS:]
    body = json.dumps({"history": history, "k": 5, "mode": "strict"})
    url = f"http://127.0.0.1:{port}"
    argv = ["serve", "--target", str(out / "target"), "--draft", str(out / "drafts" / draft),
            "--data", str(out / "data"), "--port", str(port)]
    widths = measured_widths(out / "eval", draft)
    if widths:  # evaluate measured them on these models: the app need not measure them again
        argv += ["--set", f"draft_widths={json.dumps(widths)}"]
    output = StageOutput(out / "logs", verbose)
    print("\n" + command_text(["atspeed-ray", *argv]), flush=True)
    with output.stderr(argv) as err:
        # its own session: Ctrl-C reaches only this process, which stops the server in order;
        # what it prints goes to its log (this function prints the example and the URL)
        proc = cli_process(argv, err, start_new_session=True, stdout=err)
        try:
            wait_healthy(proc, url, output, argv)
            reply = httpx.post(f"{url}/recommend", content=body,
                               headers={"content-type": "application/json"}, timeout=60)
            print("\nexample request:\n" + command_text(
                ["curl", "-s", "-X", "POST", f"{url}/recommend", "-H", "content-type: application/json",
                 "-d", body], prompt="  "), flush=True)
            print(f"reply ({reply.status_code}): {reply_text(reply.text)}\nAPI docs: {url}/docs",
                  flush=True)
            if wait if wait is not None else sys.stdin.isatty():
                print("serving; press Ctrl-C to stop", flush=True)
                proc.wait()
        except KeyboardInterrupt:
            pass
        finally:
            stop_server(proc)


def reply_text(text: str) -> str:
    """A /recommend reply in one short line: its items and their scores (2 decimals); other
    replies as they came, cut to one screen line."""
    try:
        reply = json.loads(text)
        items, scores = reply["items"], [round(s, 2) for s in reply["scores"]]
    except (ValueError, KeyError, TypeError):
        return text[:80]
    return f"items {items}, scores {scores}"


def measured_widths(evaluation: Path, draft: str) -> dict[int, int | str]:
    """k -> the draft widths ``evaluate --draft-beams auto`` chose for ``draft`` (strict, at its
    first timing batch size): an N, or one per drafted level as text (``10/200/20``, as the serve
    config's ``draft_widths`` reads it); empty when evaluate ran with a fixed width."""
    from atspeed_ray.width_policy import one_or_levels, widths_text

    path = evaluation / "speed.json"
    rows = json.loads(path.read_text()) if path.is_file() else []
    out: dict[int, int | str] = {}
    for r in rows:
        if (r["method"], r["mode"]) == (draft, "strict") and "width_choice" in r \
                and r["batch_size"] == rows[0]["batch_size"]:
            w = one_or_levels(tuple(r["level_widths"]))
            out[r["k"]] = w if isinstance(w, int) else widths_text(w)
    return out


def wait_healthy(proc: subprocess.Popen, url: str, output: StageOutput, argv: list[str],
                 timeout_s: float = 240) -> None:
    import httpx

    deadline = time.time() + timeout_s
    while True:
        if proc.poll() is not None:
            raise SystemExit(output.failure(argv, proc.returncode))
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.time() > deadline:
            raise SystemExit(f"the endpoint did not come up within {timeout_s:.0f} s")
        time.sleep(2)


def stop_server(proc: subprocess.Popen, timeout_s: float = 60) -> None:
    """SIGTERM to the server alone: it shuts Serve and its Ray instance down in order (signalling
    the whole group would kill the Serve controller under ``serve.shutdown``). Its process group
    (Ray's processes included) is killed only if that takes longer than ``timeout_s``."""
    if proc.poll() is None:
        t0 = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
            print(f"server stopped in {time.perf_counter() - t0:.1f} s", flush=True)
        except subprocess.TimeoutExpired:
            print(f"the server did not stop within {timeout_s:.0f} s: killing it", flush=True)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # whatever of its session is left
    except ProcessLookupError:
        pass
    proc.wait()
