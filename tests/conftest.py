import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# Kernels held back (ATEN_CPU_CAPABILITY=avx2 ...) get their own torch.compile cache: inductor's cache key does not
# name the vector ISA, and a kernel it compiled for AVX-512 run with AVX2 code around it (or the reverse) gave NaN
# logits and corrupted the heap (seen with both settings sharing /tmp/torchinductor_<user>).
HELD = [f"{k}={os.environ[k]}" for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
        if k in os.environ]
if HELD and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(
        tempfile.gettempdir(), f"torchinductor-{os.getuid()}-" + "-".join(h.replace("=", "_") for h in HELD))

import pytest  # noqa: E402
import torch  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"


def pytest_report_header(config):
    """The kernels this run uses, since exact tests are rerun with them held back (see .ci/run)."""
    return (f"cpu kernels: aten {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} thread(s)"
            + (f"; held: {', '.join(HELD)}" if HELD else ""))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """A tiny random pipeline folder written by the project's own `init`."""
    from meissonic.presets import build_pipeline

    folder = tmp_path_factory.mktemp("models") / "tiny"
    build_pipeline("tiny", seed=0).save_pretrained(folder)
    return folder
