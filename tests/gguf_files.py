"""GGUF files for tests, made here from the embedded SmolLM2 Q4_1 GGUF with gguf-py (llama.cpp's own
Python package): the same weights requantized (Q8_0, Q4_0 with gguf-py's reference quantizers) and a
split copy (gguf-split's layout: -00001-of-0000N shards, split.* keys), so a test hub can hold a real
GGUF repo with several quants."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, LlamaFileType, quants

FILE_TYPES = {"Q8_0": LlamaFileType.MOSTLY_Q8_0, "Q4_0": LlamaFileType.MOSTLY_Q4_0, "Q4_1": LlamaFileType.MOSTLY_Q4_1}


def rewrite_gguf(source: Path, out: Path, quant: str | None = None, split_max_tensors: int = 0) -> list[Path]:
    """`source` with its 2-D weights requantized to `quant` (None: as they are), optionally split into
    shards of at most `split_max_tensors` tensors. Returns the files written (first shard first)."""
    reader = GGUFReader(source)
    arch = reader.fields["general.architecture"].contents()
    writer = GGUFWriter(out, arch, split_max_tensors=split_max_tensors)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        value = field.contents()
        if field.name == "general.file_type" and quant:
            value = int(FILE_TYPES[quant])
        kind = field.types[0]
        writer.add_key_value(field.name, value, kind, sub_type=field.types[-1] if kind == GGUFValueType.ARRAY else None)
    target = GGMLQuantizationType[quant] if quant else None
    for tensor in reader.tensors:
        shape = [int(n) for n in reversed(tensor.shape)]  # numpy order
        if target is None or len(shape) < 2 or tensor.tensor_type == GGMLQuantizationType.F32:
            writer.add_tensor(tensor.name, np.asarray(tensor.data), raw_shape=None if tensor.tensor_type ==
                              GGMLQuantizationType.F32 else tensor.data.shape, raw_dtype=tensor.tensor_type)
            continue
        weights = quants.dequantize(tensor.data, tensor.tensor_type).reshape(shape)
        writer.add_tensor(tensor.name, quants.quantize(weights, target), raw_dtype=target)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if not split_max_tensors:
        return [out]
    return sorted(out.parent.glob(out.name.removesuffix(".gguf") + "-*-of-*.gguf"))


SMOLLM2_REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the embedded model was made from


def smollm2_lora_gguf(hf_folder: Path, out: Path, seed: int = 0) -> Path:
    """A random PEFT LoRA (r=8, alpha=16, q_proj and v_proj, not zero-initialized: it changes greedy output)
    over `hf_folder` (smollm2_dir), converted by llama.cpp's convert_lora_to_gguf.py to
    out/smollm2-lora-<seed>-F16.gguf, naming SmolLM2-135M-Instruct as its base. Returns that path."""
    import os
    import subprocess
    import sys
    import tempfile

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from vision_files import llama_cpp_source

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(hf_folder, dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    target = out / f"smollm2-lora-{seed}-F16.gguf"
    src = llama_cpp_source()
    with tempfile.TemporaryDirectory() as tmp:
        lora = Path(tmp) / target.stem  # its name becomes general.name
        get_peft_model(model, config).save_pretrained(lora)
        # the model card's base_model goes into general.base_model.*, as in adapters converted from the Hub's
        (lora / "README.md").write_text(f"---\nbase_model: {SMOLLM2_REPO}\nlibrary_name: peft\n---\n")
        proc = subprocess.run([sys.executable, str(src / "convert_lora_to_gguf.py"), lora, "--base", hf_folder,
                               "--outtype", "f16", "--outfile", str(target)], capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(src / "gguf-py")})
    if proc.returncode:
        raise RuntimeError(f"convert_lora_to_gguf.py failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return target
