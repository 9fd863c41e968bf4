"""`rela pack`: shards that read back as the source, byte-stable, resumable, and honest about bad input."""

import json
import signal

import numpy as np
import pytest

from rela.data.datasets import ArrayDataset, open_dataset
from rela.data.pack import pack
from rela.errors import CorruptImageError, RelaError
from tests.conftest import make_folder, run_cli, smooth_image


@pytest.fixture
def folder(tmp_path):
    return make_folder(tmp_path / "src", classes=3, per_class=10)


def test_shards_read_back_as_the_source_in_order_with_labels_and_pixels(folder, tmp_path):
    shards = pack(str(folder), tmp_path / "out", shard_mb=0.01, progress=False)
    assert len(shards) > 2 and all(p.suffix == ".tar" for p in shards)
    src, back = open_dataset(str(folder)), open_dataset(str(tmp_path / "out" / "*.tar"))
    assert len(back) == len(src) == 30 and back.labels().tolist() == src.labels().tolist()
    assert all(np.array_equal(src.load(i), back.load(i)) for i in range(len(src)))  # JPEG bytes kept
    journal = json.loads((tmp_path / "out" / "pack.json").read_text())
    assert journal["complete"] and journal["samples"] == 30 and [s["start"] for s in journal["shards"]][0] == 0
    again = pack(str(folder), tmp_path / "out2", shard_mb=0.01, progress=False)
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in shards]  # the same bytes every time


def test_other_images_are_encoded_and_large_ones_shrunk(tmp_path):
    rng = np.random.default_rng(0)
    arrays = ArrayDataset(np.stack([smooth_image(rng, 40, 30) for _ in range(6)]), np.arange(6) % 2)
    pack(arrays, tmp_path / "q", quality=95, progress=False)
    back = open_dataset(str(tmp_path / "q" / "*.tar"))
    assert back.labels().tolist() == arrays.labels().tolist()
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arrays.load(3)).save(buf, "JPEG", quality=95)  # what a JPEG at quality 95 decodes to
    assert np.array_equal(back.load(3), np.asarray(Image.open(buf).convert("RGB")))
    pack(arrays, tmp_path / "small", max_side=16, progress=False)
    assert open_dataset(str(tmp_path / "small" / "*.tar")).load(0).shape == (16, 12, 3)  # longer side 40 -> 16


def test_a_killed_pack_resumes_and_writes_what_an_uninterrupted_one_writes(folder, tmp_path):
    args = ["pack", "--data", str(folder), "--out", str(tmp_path / "out"), "--shard-mb", "0.01", "--quiet"]
    assert run_cli(*args, env={"RELA_CRASH_AT": "shard-written:3"}).returncode == -signal.SIGKILL
    journal = json.loads((tmp_path / "out" / "pack.json").read_text())
    assert len(journal["shards"]) == 3 and not journal["complete"]
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    assert "use it   rela train --data" in r.stdout
    whole = pack(str(folder), tmp_path / "whole", shard_mb=0.01, progress=False)
    resumed = sorted((tmp_path / "out").glob("*.tar"))
    assert [p.read_bytes() for p in resumed] == [p.read_bytes() for p in whole]


def test_bad_input_is_named_or_left_out_and_other_contents_are_not_overwritten(folder, tmp_path):
    bad = sorted((folder / "class_1").iterdir())[2]
    bad.write_bytes(b"not a jpeg at all")
    with pytest.raises(CorruptImageError, match="--skip-corrupt"):
        pack(str(folder), tmp_path / "out", progress=False)
    pack(str(folder), tmp_path / "skip", skip_corrupt=True, progress=False)
    journal = json.loads((tmp_path / "skip" / "pack.json").read_text())
    assert journal["samples"] == 29 and list(journal["skipped"].values())[0].startswith(str(bad))
    with pytest.raises(RelaError, match="holds something other than this pack.*--overwrite"):
        pack(str(folder), tmp_path / "skip", skip_corrupt=True, quality=80, progress=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    r = run_cli("pack", "--data", str(folder), "--out", str(tmp_path / "other"), "--quiet")
    assert r.returncode == 2 and "--overwrite" in r.stderr and (tmp_path / "other" / "notes.txt").exists()
