"""A vision model as llama-server takes it, a text GGUF and its mmproj GGUF, made from tests/models.py's
tiny Gemma 3 by llama.cpp's own convert_hf_to_gguf.py (from the llama.cpp tree that llama-cpp-python's
sdist vendors, downloaded once with pip). LLaVA with a CLIP tower is not an option: this converter makes
mmprojs for LlavaForConditionalGeneration with Pixtral towers only ("Unsupported model type: clip_vision_model")."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

VERSION = "0.3.36"

# convert_hf_to_gguf.py, told the pre-tokenizer: it knows released tokenizers only (by a hash of the ids they
# give a test string), and ours, trained in tests/models.py, splits text as GPT-2's does.
CONVERT = """
import runpy, sys
src = sys.argv[1]
sys.path.insert(0, src)
import conversion.base
conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
sys.argv = [src + "/convert_hf_to_gguf.py", *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def llama_cpp_source() -> Path:
    """vendor/llama.cpp of llama-cpp-python's sdist, extracted once into ~/.cache/ai-server (env LLAMA_CPP_SRC:
    use that folder instead)."""
    if os.environ.get("LLAMA_CPP_SRC"):
        return Path(os.environ["LLAMA_CPP_SRC"])
    dest = Path.home() / ".cache" / "ai-server" / f"llama.cpp-src-{VERSION}"
    if dest.is_dir():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-binary", ":all:", "--no-deps",
                        f"llama-cpp-python=={VERSION}", "-d", tmp], check=True)
        prefix = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/"
        with tarfile.open(Path(tmp) / f"llama_cpp_python-{VERSION}.tar.gz") as tar:
            tar.extractall(tmp, [m for m in tar.getmembers() if m.name.startswith(prefix)], filter="data")
        try:
            os.rename(Path(tmp) / prefix, dest)
        except OSError:  # another process got there first
            if not dest.is_dir():
                raise
    return dest


def gemma3_gguf(folder: Path, out: Path) -> tuple[Path, Path]:
    """`folder` (make_tiny_gemma3) as out/tiny-gemma3-Q8_0.gguf (the text model) and out/mmproj-tiny-gemma3-f16.gguf
    (the vision tower and projector), both by the converter, run at once. Returns (model, mmproj)."""
    src = llama_cpp_source()
    files = out / "tiny-gemma3-Q8_0.gguf", out / "mmproj-tiny-gemma3-f16.gguf"
    runs = [["--outtype", "q8_0", "--outfile", str(files[0])],
            ["--mmproj", "--outtype", "f16", "--outfile", str(files[1])]]
    env = {**os.environ, "PYTHONPATH": str(src / "gguf-py")}
    with tempfile.TemporaryFile() as log0, tempfile.TemporaryFile() as log1:
        procs = [subprocess.Popen([sys.executable, "-c", CONVERT, str(src), str(folder), *args], env=env,
                                  stdout=log, stderr=subprocess.STDOUT) for args, log in zip(runs, (log0, log1))]
        for proc, log in zip(procs, (log0, log1)):
            if proc.wait():
                log.seek(0)
                raise RuntimeError(f"convert_hf_to_gguf.py failed:\n{log.read().decode(errors='replace')[-3000:]}")
    return files
