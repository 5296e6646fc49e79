"""The README is a tested contract: every ```bash and ```python block is run, composed or
skipped with its reason written next to it, so a README command that breaks fails CI.

An HTML comment just before a block says what to do with its commands (numbered from 1):

    <!-- readme-test: compose-only 3,4: B4 on 4 GPUs; RUN=pretrain -->

- ``run`` (the default): runs the command in a folder of its own, on tiny data:
  ``/data/photos`` and the other dataset paths become a synthetic dataset of 40 images at
  64 px (:func:`ssl_mt.data.synthetic.generate_dataset`), ``runs/demo/pretrain`` and ``RUN``
  a tiny pretraining or fine-tuning run (``RUN/backbone`` the pretraining one; ``RUN=...``
  picks the other ``RUN/...``), ``/my/conf`` a config folder with ``experiment/mine.yaml``;
  Hydra apps get one 32 px epoch, ``make data`` 24 images. A command without ``data.root=``
  finds ``data/synthetic`` (what ``make data`` writes) in its folder.
- ``compose-only: reason``: checked without running: the Hydra apps print their composed
  config (``--cfg job``), the other ``python -m ssl_mt.*`` commands parse their arguments
  and stop, ``make`` targets are dry-run (``make -n``) and the apps they would start are
  composed or parsed the same way, python blocks are compiled.
- ``skip: reason``: nothing (``pip``, or a long command another test or CI runs).

A block without a marker whose command cannot be run here (``pip``, ``torchrun``, an
unknown program or shell variable) fails :func:`test_every_block_is_classified`.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ssl_mt.data.synthetic import generate_dataset
from tests.helpers import REPO, app_env

pytestmark = pytest.mark.slow

README = REPO / "README.md"
TIMEOUT_S = 240
HYDRA_APPS = ("ssl_mt.pretrain", "ssl_mt.finetune")
# One 32 px epoch: what every Hydra app command of a `run` block gets appended.
TINY = (
    "schedule.stages=[{size:32,epochs:1,batch_size:8}]",
    "schedule.eval_sizes=[32]",
    "data.num_workers=0",
)
MAKE_TINY = {"data": ("N=24", "SIZE=64")}  # make variables of a `run` of these targets
SHELL_VARIABLES = {"HEAD": "head-node", "RUN_ID": "run0", "SLURM_JOB_ID": "1"}
MODES = ("run", "compose-only", "skip")

FENCE = re.compile(r"^```(\S*)\s*$")
MARKER = re.compile(r"^<!--\s*readme-test:(.*?)-->\s*$")
CLAUSE_SPLIT = re.compile(r";\s*(?=(?:run|skip|compose-only|RUN=)\b)")
CLAUSE = re.compile(r"^(run|skip|compose-only)(?:\s+(\d+(?:\s*,\s*\d+)*))?\s*(?::\s*(.*))?$")
VARIABLE = re.compile(r"\$(\w+)|\$\{(\w+)\}")


# -- the extractor ------------------------------------------------------------------------------
@dataclass
class Command:
    index: int  # 1-based within its block
    line: int  # README line of its first line
    text: str
    mode: str = "run"
    reason: str = ""
    argv: list[str] = field(default_factory=list)  # bash: the tokens, no comments


@dataclass
class Block:
    number: int
    line: int  # the opening fence
    lang: str
    heading: str
    body: str
    commands: list[Command]
    run_kind: str = "finetune"  # what RUN/... is (RUN/backbone is always the pretraining run)
    errors: list[str] = field(default_factory=list)

    @property
    def id(self) -> str:
        slug = re.sub(r"[^a-z0-9]+", "-", self.heading.lower()).strip("-")[:40]
        return f"{self.number:02d}-{slug}"


def bash_commands(body: list[str], first_line: int) -> list[Command]:
    """The commands of a bash block: continuation lines joined, comments dropped."""
    commands: list[Command] = []
    pending: list[str] = []
    start = first_line
    for offset, raw in enumerate(body):
        if not pending:
            start = first_line + offset
            if not raw.strip() or raw.lstrip().startswith("#"):
                continue
        if raw.rstrip().endswith("\\"):
            pending.append(raw.rstrip()[:-1])
            continue
        pending.append(raw)
        text = " ".join(part.strip() for part in pending)
        pending = []
        commands.append(Command(len(commands) + 1, start, text, argv=shlex.split(text, True)))
    return commands


def apply_marker(block: Block, marker: str) -> None:
    """Sets the modes of ``block``'s commands from its marker (see the module docstring)."""
    defaults: tuple[str, str] | None = None
    chosen: dict[int, tuple[str, str]] = {}
    where = f"README.md:{block.line - 1}"
    for clause in (c.strip() for c in CLAUSE_SPLIT.split(marker.strip())):
        if clause in ("RUN=pretrain", "RUN=finetune"):
            block.run_kind = clause.split("=")[1]
            continue
        match = CLAUSE.match(clause)
        if match is None:
            block.errors.append(f"{where}: unknown readme-test clause {clause!r}")
            continue
        mode, numbers, reason = match.group(1), match.group(2), (match.group(3) or "").strip()
        if mode != "run" and not reason:
            block.errors.append(f"{where}: {mode!r} needs its reason: '{mode}: why'")
        if numbers is None:
            defaults = (mode, reason)
            continue
        for number in (int(n) for n in numbers.split(",")):
            if not 1 <= number <= len(block.commands) or number in chosen:
                block.errors.append(
                    f"{where}: command {number} of {mode!r} is not in the block's "
                    f"{len(block.commands)} commands, or is marked twice"
                )
            chosen[number] = (mode, reason)
    for command in block.commands:
        command.mode, command.reason = chosen.get(command.index, defaults or ("run", ""))


def read_blocks(text: str) -> tuple[list[Block], list[str]]:
    """The bash and python blocks of the README, and the misplaced markers."""
    lines = text.splitlines()
    blocks: list[Block] = []
    stray: list[str] = []
    marker: tuple[str, int] | None = None
    heading = "top"
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        found = MARKER.match(line)
        fence = FENCE.match(line)
        if found:
            if marker is not None:
                stray.append(f"README.md:{marker[1]}: a readme-test marker not before a block")
            marker = (found.group(1), i + 1)
        elif fence:
            end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
            if end is None:
                stray.append(f"README.md:{i + 1}: unclosed code block")
                break
            body = lines[i + 1 : end]
            lang = fence.group(1)
            if lang in ("bash", "python"):
                if lang == "bash":
                    commands = bash_commands(body, i + 2)
                else:
                    commands = [Command(1, i + 2, "\n".join(body))]
                block = Block(len(blocks) + 1, i + 1, lang, heading, "\n".join(body), commands)
                if marker is not None:
                    apply_marker(block, marker[0])
                classify(block)
                blocks.append(block)
            elif marker is not None:
                stray.append(f"README.md:{marker[1]}: marker before a ```{lang} block")
            marker = None
            i = end
        elif marker is not None and line.strip():
            stray.append(f"README.md:{marker[1]}: a readme-test marker not before a block")
            marker = None
        i += 1
    return blocks, stray


# -- what a command is ----------------------------------------------------------------------------
def program(argv: list[str]) -> tuple[str, list[str]] | None:
    """(kind, argv) of a bash command: ``hydra`` / ``cli`` (argv: module and its args),
    ``make`` (argv: target and variables), ``launcher`` (torchrun / srun: the inner app);
    None when this test does not know it."""
    if len(argv) >= 3 and argv[0] in ("python", "python3") and argv[1] == "-m":
        if argv[2].startswith("ssl_mt."):
            return ("hydra" if argv[2] in HYDRA_APPS else "cli"), argv[2:]
        return None
    if argv and argv[0] == "make":
        return "make", argv[1:]
    if argv and argv[0] == "srun":
        inner = program(argv[1:])
        return ("launcher", inner[1]) if inner and inner[0] in ("hydra", "cli") else None
    if argv and argv[0] == "torchrun" and "-m" in argv:
        module_args = argv[argv.index("-m") + 1 :]
        inner = program(["python", "-m", *module_args])
        return ("launcher", inner[1]) if inner else None
    return None


def classify(block: Block) -> None:
    """Records in ``block.errors`` each command its mode cannot handle."""
    if block.lang == "python":
        return
    for command in block.commands:
        if command.mode == "skip":
            continue
        where = f"README.md:{command.line}: `{command.text}`"
        unknown = [m.group(1) or m.group(2) for m in VARIABLE.finditer(command.text)]
        unknown = [name for name in unknown if name not in SHELL_VARIABLES]
        kind = program(command.argv)
        if unknown:
            block.errors.append(f"{where}: unknown shell variable(s) {unknown}")
        elif kind is None:
            block.errors.append(
                f"{where}: cannot be classified (not python -m ssl_mt.*, make, torchrun or "
                "srun); mark it: <!-- readme-test: skip N: reason -->"
            )
        elif kind[0] == "launcher" and command.mode == "run":
            block.errors.append(
                f"{where}: a launcher cannot run here; mark it compose-only with the reason"
            )


BLOCKS, STRAY = read_blocks(README.read_text(encoding="utf-8"))


# -- the workspace: tiny data, runs and substitutions -----------------------------------------
@dataclass
class Workspace:
    root: Path
    photos: Path
    my_conf: Path
    stamp: Path
    runs: dict[str, Path]

    def substitute(self, text: str, run_kind: str) -> str:
        """The README's paths replaced by the workspace's, and the shell variables set."""
        pairs = [
            (r"/data/photos", self.photos),
            (r"/data/new_photos", self.photos / "images"),
            (r"/data/unlabeled", self.photos / "images"),
            (r"data/demo(?![\w-])", self.photos),
            (r"runs/demo/pretrain(?![\w-])", self.runs["pretrain"]),
            (r"RUN/backbone", self.runs["pretrain"] / "backbone"),
            (r"RUN(?=/)", self.runs[run_kind]),
        ]
        for pattern, path in pairs:
            text = re.sub(r"(?<![\w.-])(?<![\w.]/)" + pattern, lambda _, p=path: str(p), text)
        text = re.sub(r"(?<![\w.-])/my/conf", str(self.my_conf), text)
        return VARIABLE.sub(lambda m: SHELL_VARIABLES[m.group(1) or m.group(2)], text)


def environment(home: Path) -> dict[str, str]:
    env = app_env(home)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HYDRA_FULL_ERROR="1")
    return env


def execute(argv: list[str], cwd: Path, input_text: str | None = None) -> dict[str, object]:
    cwd.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(
            argv,
            cwd=cwd,
            env=environment(cwd),
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
            input=input_text,
        )
    except subprocess.TimeoutExpired as err:
        return {"rc": f"timed out after {TIMEOUT_S} s", "output": str(err.stdout)[-3000:]}
    return {"rc": done.returncode, "output": (done.stdout + done.stderr)[-4000:]}


def tiny_run(app: str, ws_root: Path) -> dict[str, object]:
    run_dir = ws_root / "runs" / app
    argv = [sys.executable, "-m", f"ssl_mt.{app}", "experiment=quick"]
    argv += [f"data.root={ws_root / 'photos'}", f"hydra.run.dir={run_dir}", *TINY]
    return execute(argv, ws_root)


def make_argv(args: list[str], ws: Workspace, dry: bool) -> list[str]:
    """``make -f REPO/Makefile``, the venv's python, no install step (``-o`` the stamp)."""
    target = args[0] if args else ""
    extra = [] if dry else list(MAKE_TINY.get(target, ()))
    flags = ["-n"] if dry else []
    flags += ["-o", str(ws.stamp)]
    return ["make", *flags, "-f", str(REPO / "Makefile"), *args, *extra, *ws_vars(ws)]


def ws_vars(ws: Workspace) -> list[str]:
    return [f"PY={sys.executable}", f"STAMP={ws.stamp}", f"VENV={Path(sys.executable).parents[1]}"]


def run_command(block: Block, command: Command, ws: Workspace) -> dict[str, object]:
    cwd = ws.root / "commands" / f"b{block.number:02d}c{command.index}"
    cwd.mkdir(parents=True, exist_ok=True)
    if block.lang == "python":
        code = ws.substitute(command.text, block.run_kind)
        return execute([sys.executable, "-"], cwd, input_text=code)
    argv = [ws.substitute(token, block.run_kind) for token in command.argv]
    kind, args = program(argv)  # type: ignore[misc]  # classified before
    if kind == "make":
        return execute(make_argv(args, ws, dry=False), cwd)
    if kind == "hydra":
        if not any(a.startswith("data.root=") for a in args):
            (cwd / "data").mkdir(exist_ok=True)
            (cwd / "data" / "synthetic").symlink_to(ws.photos, target_is_directory=True)
        args = [*args, *TINY]
    return execute([sys.executable, "-m", *args], cwd)


# -- composing without running (in one process: the imports once) -------------------------------
class _Parsed(Exception):
    """Raised once a command line parsed: nothing after it runs."""


@contextlib.contextmanager
def _parse_only():
    import argparse

    depth = [0]
    originals = {
        name: getattr(argparse.ArgumentParser, name) for name in ("parse_args", "parse_known_args")
    }

    def wrap(name):
        def parse(self, *args, **kwargs):
            depth[0] += 1
            try:
                result = originals[name](self, *args, **kwargs)
            finally:
                depth[0] -= 1
            if depth[0] == 0:
                raise _Parsed()
            return result

        return parse

    for name in originals:
        setattr(argparse.ArgumentParser, name, wrap(name))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(argparse.ArgumentParser, name, original)


def compose_one(kind: str, args: list[str]) -> dict[str, object]:
    """``--cfg job`` of a Hydra app, or the argument parsing of another ssl_mt command
    (``failed``: what went wrong before, e.g. ``make -n``)."""
    if kind == "failed":
        return {"rc": args[0], "output": args[1][-4000:]}
    import importlib
    import runpy

    from hydra.core.global_hydra import GlobalHydra

    module, rest = args[0], args[1:]
    out = io.StringIO()
    saved = sys.argv
    rc: object = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            if kind == "hydra":
                sys.argv = [module, *rest, "--cfg", "job"]
                importlib.import_module(module).main()
            else:
                sys.argv = [module, *rest]
                with _parse_only():
                    runpy.run_module(module, run_name="__main__", alter_sys=True)
                rc = f"{module} returned without parsing its arguments with argparse"
    except _Parsed:
        rc = 0
    except SystemExit as err:
        rc = err.code or 0
    except Exception as err:  # reported, with the command, by the test
        rc = f"{type(err).__name__}: {err}"
    finally:
        sys.argv = saved
        GlobalHydra.instance().clear()
    return {"rc": rc, "output": out.getvalue()[-4000:]}


def compose_main(requests: str, results: str) -> None:
    """Entry point of the composing subprocess: a JSON list of (kind, argv) in, results out."""
    done = [compose_one(kind, args) for kind, args in json.loads(Path(requests).read_text())]
    Path(results).write_text(json.dumps(done))


def compose_requests(block: Block, command: Command, ws: Workspace) -> list[tuple[str, list]]:
    """What composing ``command`` means: its app, or the apps its make target would start."""
    argv = [ws.substitute(token, block.run_kind) for token in command.argv]
    kind, args = program(argv)  # type: ignore[misc]
    if kind == "launcher":
        kind = "hydra" if args[0] in HYDRA_APPS else "cli"
    if kind != "make":
        return [(kind, args)]
    done = subprocess.run(
        make_argv(args, ws, dry=True), cwd=REPO, capture_output=True, text=True, timeout=60
    )
    if done.returncode != 0:
        return [("failed", [f"make -n exited {done.returncode}", done.stdout + done.stderr])]
    requests = []
    for line in done.stdout.splitlines():
        tokens = shlex.split(line) if " -m ssl_mt." in line else []
        if tokens and tokens[0] == sys.executable and tokens[1] == "-m":
            requests.append(("hydra" if tokens[2] in HYDRA_APPS else "cli", tokens[2:]))
    return requests


# -- fixtures: everything selected starts at once, two at a time -------------------------------
def selected_blocks(request: pytest.FixtureRequest) -> list[Block]:
    numbers = set()
    for item in request.session.items:
        block = getattr(getattr(item, "callspec", None), "params", {}).get("block")
        if isinstance(block, Block) and item.path == Path(__file__):
            numbers.add(block.number)
    return [b for b in BLOCKS if b.number in numbers and not b.errors]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    root = tmp_path_factory.mktemp("readme")
    photos = generate_dataset(root / "photos", n=40, size=64, seed=0, workers=1, progress=False)
    my_conf = root / "my_conf"
    (my_conf / "experiment").mkdir(parents=True)
    (my_conf / "experiment" / "mine.yaml").write_text(
        "# @package _global_\ndefaults:\n  - quick\n\nexperiment_name: mine\n"
    )
    (my_conf / "tasks").mkdir()
    (my_conf / "tasks" / "my_tasks.yaml").write_text("defaults:\n  - default\n  - _self_\n")
    stamp = root / ".installed"  # make -o: never remade, so make installs nothing
    stamp.touch()
    with ThreadPoolExecutor(2) as pool:
        made = dict(
            zip(
                ("pretrain", "finetune"),
                pool.map(lambda a: tiny_run(a, root), ("pretrain", "finetune")),
                strict=True,
            )
        )
    for app, result in made.items():
        assert result["rc"] == 0, f"the tiny {app} run for RUN failed:\n{result['output']}"
    runs = {app: root / "runs" / app for app in made}
    return Workspace(root, photos, my_conf, stamp, runs)


@pytest.fixture(scope="module")
def outcomes(request: pytest.FixtureRequest, workspace: Workspace):
    """Futures of every selected command's outcome, by (block, command index)."""
    blocks = selected_blocks(request)
    futures: dict[tuple[int, int], Future] = {}
    requests: list[tuple[str, list]] = []
    spans: dict[tuple[int, int], slice] = {}
    for block in blocks:
        for command in block.commands:
            key = (block.number, command.index)
            if command.mode == "compose-only" and block.lang == "bash":
                found = compose_requests(block, command, workspace)
                spans[key] = slice(len(requests), len(requests) + len(found))
                requests += found
    pool = ThreadPoolExecutor(2)
    composed = pool.submit(compose_all, requests, workspace.root)
    for block in blocks:
        for command in block.commands:
            if command.mode == "run":
                futures[(block.number, command.index)] = pool.submit(
                    run_command, block, command, workspace
                )
    yield futures, composed, spans
    pool.shutdown(wait=True, cancel_futures=True)


def compose_all(requests: list[tuple[str, list]], root: Path) -> list[dict[str, object]]:
    if not requests:
        return []
    inputs, results = root / "compose_requests.json", root / "compose_results.json"
    inputs.write_text(json.dumps(requests))
    code = f"from tests.test_readme import compose_main; compose_main({str(inputs)!r}, {str(results)!r})"
    done = execute([sys.executable, "-c", code], root / "compose")
    assert done["rc"] == 0, f"the composing process failed:\n{done['output']}"
    return json.loads(results.read_text())


# -- the tests ----------------------------------------------------------------------------------
def test_every_block_is_classified():
    """Catches a README block this test would not know what to do with (a new GPU command
    without a marker, pip, a launcher to run) and markers that lost their block."""
    errors = STRAY + [error for block in BLOCKS for error in block.errors]
    assert not errors, "\n".join(errors)
    assert len(BLOCKS) >= 20, "the README's bash/python blocks were not found"


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_readme_block(block: Block, outcomes) -> None:
    """Catches a README command that fails as written (a missing file it names, a key not in
    the config, a flag the command does not take)."""
    assert not block.errors, "\n".join(block.errors)
    if all(command.mode == "skip" for command in block.commands):
        pytest.skip("; ".join(sorted({c.reason for c in block.commands})))
    futures, composed, spans = outcomes
    failures = []
    for command in block.commands:
        where = f"README.md:{command.line} ({command.mode}): {command.text}"
        if command.mode == "run":
            results = [futures[(block.number, command.index)].result()]
        elif command.mode == "compose-only" and block.lang == "python":
            try:
                compile(command.text, f"README.md:{command.line}", "exec")
                results = [{"rc": 0, "output": ""}]
            except SyntaxError as err:
                results = [{"rc": str(err), "output": ""}]
        elif command.mode == "compose-only":
            results = composed.result()[spans[(block.number, command.index)]]
        else:
            continue
        for result in results:
            if result["rc"] != 0:
                failures.append(f"{where}\n  -> {result['rc']}\n{result['output']}")
    assert not failures, "\n\n".join(failures)


GROUP_ROW = re.compile(r"^\| `(\w+)`[^|]*\| (.*) \|$")


def test_config_table_lists_every_option_of_every_group():
    """Catches a config group or option added to conf/ (or removed) but not to the table."""
    text = README.read_text(encoding="utf-8")
    table = text.split("composed from groups:", 1)[1].split("\n\n", 2)[1]
    listed = {}
    for line in table.splitlines():
        match = GROUP_ROW.match(line)
        if match:
            options = re.findall(r"`([\w]+)`", match.group(2))
            listed[match.group(1)] = set(options)
    conf = REPO / "conf"
    groups = {p.name: {y.stem for y in p.glob("*.yaml")} for p in conf.iterdir() if p.is_dir()}
    assert set(listed) == set(groups), f"README.md config table vs conf/: {listed} vs {groups}"
    for group, options in groups.items():
        assert listed[group] == options, f"README.md row `{group}` vs conf/{group}/: {options}"
