"""Which vLLM releases have the APIs apo-ray calls: each release's wheel, read in place.

pip finds the wheel (`pip install --dry-run --no-deps --report`, with fast-deps so nothing large is fetched);
the files below are then read out of the remote zip by HTTP range requests, a few hundred kB per release
instead of the 300+ MB wheel. Writes benchmarks/results/install/vllm_api_range.md.

    .venv/bin/python -m benchmarks.vllm_api_range 0.27.1 0.28.0 0.32.0 0.33.0
"""

from __future__ import annotations

import argparse
import io
import json
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
from pathlib import Path

# (file in the wheel, pattern, what apo-ray uses it for); apo_ray/vllm_version.py states the range they give.
CHECKS = (
    (
        "vllm/v1/worker/gpu_model_runner.py",
        r"def reload_weights\([^)]*weights_iterator[^)]*is_checkpoint_format",
        "worker reload_weights(weights_iterator=, is_checkpoint_format=): object_store / disk sync",
    ),
    ("vllm/config/__init__.py", r"WeightTransferConfig", "WeightTransferConfig (rollout.weight_sync=nccl)"),
    ("vllm/v1/worker/gpu_worker.py", r"def init_weight_transfer_engine", "worker init_weight_transfer_engine"),
    ("vllm/v1/worker/gpu_worker.py", r"def start_weight_update", "worker start_weight_update / finish_weight_update"),
    ("vllm/distributed/weight_transfer/base.py", r"class ModuleSource", "weight_transfer.base.ModuleSource"),
    (
        "vllm/distributed/weight_transfer/nccl_engine.py",
        r"class NCCLTrainerWeightTransferEngine",
        "NCCLTrainerWeightTransferEngine",
    ),
    (
        "vllm/distributed/weight_transfer/nccl_engine.py",
        r"def trainer_init\(\s*cls,\s*init_info[^)]*client[^)]*source",
        "trainer_init(init_info, client=, source=)",
    ),
    ("vllm/distributed/weight_transfer/nccl_engine.py", r"class NCCLTrainerInitInfo", "NCCLTrainerInitInfo"),
    (
        "vllm/distributed/weight_transfer/nccl_engine.py",
        r"packed_buffer_size_bytes: int",
        "NCCLTrainerInitInfo(packed=, packed_buffer_size_bytes=): the bucketed NCCL sync (rollout.sync_bucket_mb)",
    ),
)
OUT = Path(__file__).resolve().parent / "results" / "install" / "vllm_api_range.md"


class RemoteFile(io.RawIOBase):
    """A read-only, seekable view of a URL, one range request per read."""

    def __init__(self, url: str):
        self.url, self.position = url, 0
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD")) as response:
            self.size = int(response.headers["Content-Length"])

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = 0) -> int:
        self.position = {0: offset, 1: self.position + offset, 2: self.size + offset}[whence]
        return self.position

    def readinto(self, buffer) -> int:
        count = min(len(buffer), self.size - self.position)
        if count <= 0:
            return 0
        request = urllib.request.Request(
            self.url, headers={"Range": f"bytes={self.position}-{self.position + count - 1}"}
        )
        with urllib.request.urlopen(request) as response:
            data = response.read()
        buffer[: len(data)] = data
        self.position += len(data)
        return len(data)


def wheel_url(version: str) -> str:
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "report.json"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--isolated",
                "--dry-run",
                "--ignore-installed",
                "--no-deps",
                "--only-binary",
                ":all:",
                "--use-feature=fast-deps",
                "--quiet",
                "--report",
                str(report),
                f"vllm=={version}",
            ],
            check=True,
        )
        return json.loads(report.read_text())["install"][0]["download_info"]["url"]


def check(version: str) -> list[bool]:
    wheel = zipfile.ZipFile(io.BufferedReader(RemoteFile(wheel_url(version)), buffer_size=1 << 16))
    names = set(wheel.namelist())
    texts = {path: wheel.read(path).decode() for path in {c[0] for c in CHECKS} if path in names}
    return [path in texts and re.search(pattern, texts[path]) is not None for path, pattern, _ in CHECKS]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("versions", nargs="+", help="vllm releases to check, e.g. 0.27.1 0.28.0")
    args = parser.parse_args()
    rows = [(version, check(version)) for version in args.versions]
    header = "| API | " + " | ".join(version for version, _ in rows) + " |"
    lines = [
        "# vLLM APIs apo-ray calls, by release",
        "",
        f"`python -m benchmarks.vllm_api_range {' '.join(args.versions)}`, {time.strftime('%Y-%m-%d')}: each",
        "release's `vllm` wheel (linux x86_64), its files read in place. yes = the file has the API.",
        "",
        header,
        "| --- |" + " --- |" * len(rows),
        *(
            f"| {what} | " + " | ".join("yes" if found[i] else "no" for _, found in rows) + " |"
            for i, (_, _, what) in enumerate(CHECKS)
        ),
        "",
        "All: " + ", ".join(version for version, found in rows if all(found)),
    ]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
