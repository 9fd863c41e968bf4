import importlib.metadata

from tests.conftest import run_cli


def test_help_for_every_command():
    for args in ([], ["convert"], ["info"]):
        r = run_cli(*args, "--help")
        assert r.returncode == 0 and "usage: rela" in r.stdout


def test_console_script_is_installed():
    eps = importlib.metadata.entry_points(group="console_scripts")
    assert any(ep.name == "rela" and ep.value == "rela.cli:main" for ep in eps)


def test_info_prints_manifest_and_stats(tmp_path, npz_dataset):
    out = tmp_path / "s"
    r = run_cli("convert", "--data", str(npz_dataset), "--prior", "random:resnet18", "--input-size", "32",
                "--dim", "8", "--out", str(out), "--workers", "0")
    assert r.returncode == 0, r.stderr
    assert "prior features" in r.stderr  # the progress bar
    r = run_cli("info", str(out))
    assert r.returncode == 0
    assert "[300, 8] float16 from 512-d" in r.stdout and "NaN 0, inf 0" in r.stdout
    r = run_cli("info", str(out), "--json")
    import json

    info = json.loads(r.stdout)
    assert info["manifest"]["dim"] == 8 and len(info["stats"]["std"]) == 8
    r = run_cli("info", str(tmp_path))
    assert r.returncode == 2 and "not a target store" in r.stderr
