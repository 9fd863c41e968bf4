"""The docs name what exists: every `rela.x.y` path in the README, docs/ and the strings of rela's
source (docstrings, error messages) imports (a module, or an attribute of one); every flag the
docs show exists on its command."""

import ast
import importlib
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PATH = re.compile(r"`(rela(?:\.[A-Za-z_][A-Za-z0-9_]*)+)")
MESSAGE_PATH = re.compile(r"(?<![\w.`])(rela(?:\.[A-Za-z_][A-Za-z0-9_]*)+)")  # in code strings: no backticks


def named_paths() -> dict[str, str]:
    """Each dotted rela path -> the first file naming it: in backticks in the docs, anywhere in the
    strings of rela's source (docstrings, and the error messages that tell users what to import)."""
    texts = {p: p.read_text() for p in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]}
    for py in sorted((REPO / "rela").rglob("*.py")) + sorted((REPO / "kernels").rglob("*.py")):
        # every string in the source: docstrings and the messages users read (errors, warnings)
        texts[py] = "\n".join(node.value for node in ast.walk(ast.parse(py.read_text()))
                              if isinstance(node, ast.Constant) and isinstance(node.value, str))
    found: dict[str, str] = {}
    for path, text in texts.items():
        for name in (PATH if path.suffix == ".md" else MESSAGE_PATH).findall(text):
            found.setdefault(name.rstrip("."), str(path.relative_to(REPO)))
    return found


def resolves(name: str) -> bool:
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def test_the_docs_name_paths_that_import():
    names = named_paths()
    assert len(names) > 20  # the scan found the docs
    missing = {n: where for n, where in names.items() if not resolves(n)}
    assert not missing, f"named in the docs but not importable: {missing}"


@pytest.mark.parametrize("stale", ["rela.pca", "rela.datasets", "rela.training.ssl"])
def test_the_check_catches_a_stale_name(stale):
    assert not resolves(stale)


COMMAND = re.compile(r"(?:^|`|\$ )((?:rela [a-z]+|python3? (?:bench|examples|scripts)/[\w/]+\.py)\b[^`\n]*)", re.M)


def named_flags() -> dict[str, set[str]]:
    """Each command the README and docs/ show (`rela SUB ...`, `python bench|examples|scripts/X.py
    ...`, in code blocks or inline, a backslash-continued line included) -> the --flags shown with it."""
    from rela.cli import build_parser

    commands = set(build_parser()._subparsers._group_actions[0].choices)
    found: dict[str, set[str]] = {}
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        text = doc.read_text().replace("\\\n", " ")
        for line in COMMAND.findall(text):
            words = line.split()
            flags = re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", line)
            subs = words[1].split("/") if words[0] == "rela" else [words[1]]  # `rela convert/train --x`: both
            for sub in (s for s in subs if words[0] != "rela" or s in commands):  # not prose ("rela is ...")
                found.setdefault(f"{words[0]} {sub}", set()).update(flags)
    return found


def accepted_flags(cmd: str) -> set[str]:
    if cmd.startswith("rela "):
        from rela.cli import build_parser

        sub = build_parser()._subparsers._group_actions[0].choices[cmd.split()[1]]
        return {s for a in sub._actions for s in a.option_strings}
    script = REPO / cmd.split()[1]
    return set(re.findall(r"[\"'](--[a-z][a-z0-9-]*)[\"']", script.read_text())) | {"--help"}


def test_every_flag_the_docs_show_exists_on_the_command_they_show_it_with():
    wrong = {cmd: sorted(flags - accepted_flags(cmd)) for cmd, flags in named_flags().items()
             if (cmd.startswith("rela ") or (REPO / cmd.split()[1]).exists())}
    missing_scripts = [
        cmd for cmd in named_flags() if not cmd.startswith("rela ") and not (REPO / cmd.split()[1]).exists()
    ]
    assert not missing_scripts, missing_scripts
    assert not {cmd: flags for cmd, flags in wrong.items() if flags}


def test_every_flag_in_the_docs_exists_somewhere():
    """A flag in prose (`--switch-evidence 100`) names no command: it must exist on one of them."""
    from rela.cli import build_parser

    known = {"--help"}
    for sub in build_parser()._subparsers._group_actions[0].choices:
        known |= accepted_flags(f"rela {sub}")
    for script in [*REPO.glob("bench/*.py"), *REPO.glob("examples/*.py"), *REPO.glob("scripts/*.*")]:
        known |= accepted_flags(f"python {script.relative_to(REPO)}")
    from torch.distributed.run import get_args_parser  # torchrun's own flags, as it spells them

    known |= {s for a in get_args_parser()._actions for s in a.option_strings}
    known |= {"--nodes", "--ntasks-per-node", "--gpus-per-node", "--cpus-per-task"}  # Slurm's sbatch/srun
    known |= {"--local-dir"}  # huggingface-cli download
    shown = set()
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for span in re.findall(r"```.*?```|`[^`\n]+`", doc.read_text(), re.S):
            shown |= set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", span))
    assert not shown - known


QUICKSTART = re.compile(r"<!-- quickstart: (\w+) -->\n```\w+\n(.*?)```", re.S)
# The quickstarts as a user reads them, run at a tiny scale: these substitutions only shrink them.
TINY = {"--limit 10000": "--limit 1000", "limit=10000": "limit=1000", "--epochs 20": "--epochs 1",
        "batch_size=256": "batch_size=64", "range(2)": "range(1)"}


def quickstarts() -> dict[str, str]:
    text = (REPO / "README.md").read_text()
    found = dict(QUICKSTART.findall(text))
    assert set(found) == {"cli", "loader", "lightning"}, sorted(found)
    for a, b in TINY.items():
        found = {k: v.replace(a, b) for k, v in found.items()}
    return found


def test_the_readme_quickstarts_run(tmp_path, monkeypatch):
    import os
    import shlex
    import subprocess
    import sys

    q = quickstarts()
    for line in q["cli"].replace("\\\n", " ").splitlines():  # convert -> train -> eval, in a fresh folder
        words = shlex.split(line, comments=True)
        assert words[0] == "rela", line
        r = subprocess.run([sys.executable, "-m", "rela", *words[1:]], cwd=tmp_path, capture_output=True, text=True,
                           timeout=600, env={**os.environ, "OMP_NUM_THREADS": "2"})
        assert r.returncode == 0, (line, r.stderr[-2000:])
    assert "linear" in r.stdout.lower() and (tmp_path / "runs" / "rela20" / "eval.json").exists()

    monkeypatch.chdir(tmp_path)  # the loader swap, on the store the CLI quickstart made
    seen: list = []
    exec(q["loader"].replace("        ...", "        seen.append(batch)"), {"seen": seen})
    assert seen and seen[0]["target"].shape == (64, 64)
    assert [v.shape for v in seen[0]["views"]] == [(64, 3, 32, 32)] * 2


def test_the_lightning_quickstart_is_what_the_example_runs():
    # every rela name the diff adds is in examples/lightly_imagenet_byol.py, which the suite runs
    added = [line[1:] for line in quickstarts()["lightning"].splitlines() if line.startswith("+")]
    example = re.sub(r"\s+", " ", (REPO / "examples" / "lightly_imagenet_byol.py").read_text())
    tokens = {t for line in added for t in re.findall(
        r"rela\.\w+\(|self\.rela\]|def on_rela_step\(self, batch, batch_idx, features\)|targets=store|"
        r"batch_format=\"lightly\"|update_momentum\(self\.\w+, self\.\w+, m=momentum\)|"
        r"online_classifier\.training_step\(\(features\[0\]\.detach\(\)", line)}
    assert len(tokens) >= 9, tokens
    assert not {t for t in tokens if t not in example}
