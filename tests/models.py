"""Tiny random causal LMs with a tokenizer trained in-process: real files, made offline in ~1 s."""

from __future__ import annotations

import tempfile
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
THINKING_TEMPLATE = CHAT_TEMPLATE.replace(
    "<|im_start|>assistant\n{% endif %}",
    "<|im_start|>assistant\n{% if enable_thinking %}<think>{% endif %}{% endif %}")
CORPUS = ["hello world, the quick brown fox jumps over the lazy dog. one two three four five six seven."] * 50

FIM = ["<fim_prefix>", "<fim_suffix>", "<fim_middle>"]

def make_tokenizer(chat_template: bool | str = True, fim: bool = False, special: dict[str, str] | None = None):
    """`special`: named extra special tokens, e.g. {"image_token": "<image>"} (tok.image_token, tok.image_token_id)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>", *(FIM if fim else [])],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  unk_token="<|endoftext|>", pad_token="<|endoftext|>",
                                  **({"extra_special_tokens": special} if special else {}))
    if chat_template:
        tok.chat_template = chat_template if isinstance(chat_template, str) else CHAT_TEMPLATE
    return tok

def make_tiny_model(out: Path, seed: int = 0, chat_template: bool | str = True, fim: bool = False,
                    max_positions: int = 512) -> Path:
    """A 2-layer Llama (~0.1 M params, 64 wide: bitsandbytes' block size) saved as an HF folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer(chat_template, fim)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out

def tiny_model_files(seed: int = 0, chat_template: bool | str = True, fim: bool = False,
                     max_positions: int = 512) -> dict[str, bytes]:
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_tiny_model(Path(tmp), seed, chat_template, fim, max_positions)
        return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}

def corrupt(files: dict[str, bytes]) -> dict[str, bytes]:
    """Same repo, but weights that no loader can read."""
    return {**files, "model.safetensors": b"\x00" * 4096}

def make_tiny_diffusion(out: Path, seed: int = 0, inpainting: bool = False) -> Path:
    """A random Stable Diffusion pipeline with the tiny configs diffusers' own tests use (UNet and VAE of
    4/8 channels, a 2-layer CLIP text encoder of width 8) and a byte-level CLIP tokenizer made here (no
    merges: every character is a token). Saved with save_pretrained: model_index.json and one folder each."""
    import json

    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)} | {c + "</w>": 256 + i for i, c in enumerate(chars)}
    vocab |= {"<|startoftext|>": 512, "<|endoftext|>": 513}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n")
        tokenizer = CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), model_max_length=77)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(block_out_channels=(4, 8), layers_per_block=1, sample_size=32,
                                in_channels=9 if inpainting else 4,  # an inpainting UNet: + the mask and masked image
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=8,
                                norm_num_groups=2)
    vae = AutoencoderKL(block_out_channels=[4, 8], in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=2,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)
    text = CLIPTextModel(CLIPTextConfig(bos_token_id=512, eos_token_id=513, pad_token_id=513, hidden_size=8,
                                        intermediate_size=37, num_attention_heads=2, num_hidden_layers=2,
                                        vocab_size=1000))
    from diffusers import StableDiffusionInpaintPipeline

    cls = StableDiffusionInpaintPipeline if inpainting else StableDiffusionPipeline
    pipe = cls(unet=unet, vae=vae, text_encoder=text, tokenizer=tokenizer, scheduler=DDIMScheduler(),
               safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out)
    return out

def make_tiny_vae(out: Path, seed: int = 5) -> Path:
    """Another random VAE of the tiny pipeline's shape, saved as a diffusers folder (config.json and
    diffusion_pytorch_model.safetensors, as VAE repos on the Hub are)."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    AutoencoderKL(block_out_channels=[4, 8], in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=2,
                  down_block_types=["DownEncoderBlock2D"] * 2,
                  up_block_types=["UpDecoderBlock2D"] * 2).save_pretrained(out, safe_serialization=True)
    return out


def make_tiny_sd_lora(out: Path, seed: int = 1, kohya: bool = False) -> Path:
    """A random LoRA (PEFT, rank 4, not zero-initialized) of the tiny pipeline's UNet attention, saved as one
    .safetensors file at `out`: diffusers' keys (save_lora_weights), or with kohya=True the Kohya/A1111 keys
    (lora_unet_<module path with _>.lora_down/.lora_up.weight, .alpha) that A1111 users' files have."""
    import shutil

    import torch
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    with tempfile.TemporaryDirectory() as tmp:
        pipe = StableDiffusionPipeline.from_pretrained(make_tiny_diffusion(Path(tmp) / "sd"), local_files_only=True)
        torch.manual_seed(seed)
        pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                         init_lora_weights=False))
        StableDiffusionPipeline.save_lora_weights(Path(tmp) / "lora", unet_lora_layers=get_peft_model_state_dict(
            pipe.unet), safe_serialization=True)
        saved = Path(tmp) / "lora" / "pytorch_lora_weights.safetensors"
        if not kohya:
            shutil.copyfile(saved, out)
            return out
        kohya_sd = {}
        for key, value in load_file(saved).items():  # unet.<path>.lora_A.weight -> lora_unet_<path_>.lora_down.weight
            module, _, kind = key.removeprefix("unet.").rpartition(".lora_")
            name = "lora_unet_" + module.replace(".", "_")
            kohya_sd[f"{name}.{'lora_down' if kind.startswith('A') else 'lora_up'}.weight"] = value
            kohya_sd[f"{name}.alpha"] = torch.tensor(4.0)
        save_file(kohya_sd, out)
    return out


def tiny_diffusion_files(seed: int = 0, inpainting: bool = False) -> dict[str, bytes]:
    with tempfile.TemporaryDirectory() as tmp:
        root = make_tiny_diffusion(Path(tmp) / "sd", seed, inpainting)
        return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}

def tiny_cross_encoder_files(seed: int = 0) -> dict[str, bytes]:
    """A 2-layer BertForSequenceClassification with one label (a cross-encoder, as
    cross-encoder/ms-marco-* ship) and a WordPiece tokenizer trained here."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    tk = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tk.normalizer = normalizers.BertNormalizer(lowercase=True)
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tk.train_from_iterator(CORPUS + ["paris is the capital of france. berlin is in germany. cats sleep a lot."] * 20,
                           trainers.WordPieceTrainer(vocab_size=300, special_tokens=["[PAD]", "[UNK]", "[CLS]",
                                                                                      "[SEP]", "[MASK]"]))
    cls, sep = tk.token_to_id("[CLS]"), tk.token_to_id("[SEP]")
    tk.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                      special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                  sep_token="[SEP]", mask_token="[MASK]", model_max_length=128)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128, num_labels=1)
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        BertForSequenceClassification(cfg).save_pretrained(folder)
        tok.save_pretrained(folder)
        return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}

WHISPER_SPECIALS = ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|de|>", "<|translate|>", "<|transcribe|>",
                    "<|startoflm|>", "<|startofprev|>", "<|nocaptions|>", "<|notimestamps|>"]

def make_tiny_whisper(out: Path, seed: int = 0) -> Path:
    """A random multilingual Whisper (1+1 layers, 32 wide) with a byte-level BPE trained here, the 80-bin
    feature extractor and the generation config Whisper's generate needs (languages, tasks, no timestamps)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (GenerationConfig, WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration,
                              WhisperProcessor, WhisperTokenizerFast)

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=WHISPER_SPECIALS,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = WhisperTokenizerFast(tokenizer_object=tk, unk_token="<|endoftext|>", bos_token="<|endoftext|>",
                               eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    ids = {t: tk.token_to_id(t) for t in WHISPER_SPECIALS}
    cfg = WhisperConfig(vocab_size=len(tok), d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=80,
                        max_source_positions=1500, max_target_positions=64,
                        decoder_start_token_id=ids["<|startoftranscript|>"], eos_token_id=ids["<|endoftext|>"],
                        pad_token_id=ids["<|endoftext|>"], bos_token_id=ids["<|endoftext|>"], begin_suppress_tokens=[],
                        suppress_tokens=[])
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(cfg)
    model.generation_config = GenerationConfig(
        decoder_start_token_id=ids["<|startoftranscript|>"], eos_token_id=ids["<|endoftext|>"],
        pad_token_id=ids["<|endoftext|>"], no_timestamps_token_id=ids["<|notimestamps|>"],
        lang_to_id={"<|en|>": ids["<|en|>"], "<|de|>": ids["<|de|>"]},
        task_to_id={"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]}, is_multilingual=True,
        begin_suppress_tokens=[], suppress_tokens=[], max_length=32)
    model.save_pretrained(out)
    WhisperProcessor(WhisperFeatureExtractor(feature_size=80), tok).save_pretrained(out)
    return out

def make_tiny_vits(out: Path, seed: int = 0) -> Path:
    """A random VITS (MMS-TTS's architecture: 1 layer, 16 wide, 16 kHz) with a character vocabulary."""
    import json

    import torch
    from transformers import VitsConfig, VitsModel, VitsTokenizer

    chars = list(" abcdefghijklmnopqrstuvwxyz.,!?'")
    with tempfile.TemporaryDirectory() as tmp:
        vocab = Path(tmp) / "vocab.json"
        vocab.write_text(json.dumps({c: i for i, c in enumerate(["<pad>", *chars])}))
        tok = VitsTokenizer(str(vocab), phonemize=False, add_blank=True, pad_token="<pad>", unk_token="<pad>")
    cfg = VitsConfig(vocab_size=len(chars) + 1, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     ffn_dim=32, flow_size=16, spectrogram_bins=33, upsample_initial_channel=16,
                     upsample_rates=[4, 4], upsample_kernel_sizes=[8, 8], resblock_kernel_sizes=[3],
                     resblock_dilation_sizes=[[1, 3]], prior_encoder_num_flows=1, prior_encoder_num_wavenet_layers=1,
                     posterior_encoder_num_wavenet_layers=1, duration_predictor_num_flows=1,
                     duration_predictor_filter_channels=16, depth_separable_num_layers=1, sampling_rate=16000)
    torch.manual_seed(seed)
    VitsModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out

def folder_files(make, seed: int = 0) -> dict[str, bytes]:
    with tempfile.TemporaryDirectory() as tmp:
        folder = make(Path(tmp) / "m", seed)
        return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}

VISION_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
    "{% if p['type'] == 'image' %}<image>{% elif p['type'] == 'text' %}{{ p['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

def tiny_text_config(tok, model_type: str, max_positions: int) -> dict:
    """The text model of the tiny multimodal models: 2 layers, 64 wide, 4 heads (2 for keys and values)."""
    return {"model_type": model_type, "vocab_size": len(tok), "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": max_positions, "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}


def make_tiny_llava(out: Path, seed: int = 0) -> Path:
    """A random LLaVA (2-layer CLIP vision tower, 28 px images in 14 px patches: 4 image tokens; 2-layer
    Llama) with the tokenizer above plus an `<image>` token and a chat template taking image parts."""
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    try:
        from transformers import CLIPImageProcessorPil as ImageProcessor
    except ImportError:
        from transformers import CLIPImageProcessor as ImageProcessor

    tok = make_tokenizer(VISION_TEMPLATE, special={"image_token": "<image>"})
    images = ImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    processor = LlavaProcessor(images, tok, chat_template=VISION_TEMPLATE, patch_size=14,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1)
    cfg = LlavaConfig(
        vision_config={"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": 28, "patch_size": 14},
        text_config=tiny_text_config(tok, "llama", 512),
        image_token_id=tok.image_token_id)
    torch.manual_seed(seed)
    LlavaForConditionalGeneration(cfg).save_pretrained(out)
    processor.save_pretrained(out)
    return out

def make_tiny_idefics3(out: Path, seed: int = 0) -> Path:
    """A random Idefics3 (SmolVLM's architecture: a 2-layer SigLIP-style tower on 28 px images, pixel-shuffled to
    one image token; 2-layer Llama) with the tokenizer above plus Idefics3's image tokens; no image splitting."""
    import torch
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    try:
        from transformers import Idefics3ImageProcessorPil as ImageProcessor
    except ImportError:
        from transformers import Idefics3ImageProcessor as ImageProcessor

    tok = make_tokenizer(VISION_TEMPLATE, special={"image_token": "<image>", "global_image_token": "<global-img>",
                                                   "fake_image_token": "<fake_token_around_image>"})
    images = ImageProcessor(size={"longest_edge": 28}, max_image_size={"longest_edge": 28}, do_image_splitting=False)
    cfg = Idefics3Config(vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                        "num_attention_heads": 4, "image_size": 28, "patch_size": 14},
                         text_config=tiny_text_config(tok, "llama", 512), scale_factor=2, image_token_id=tok.image_token_id)
    torch.manual_seed(seed)
    Idefics3ForConditionalGeneration(cfg).save_pretrained(out)
    Idefics3Processor(images, tok, image_seq_len=1, chat_template=VISION_TEMPLATE).save_pretrained(out)
    return out


def make_tiny_gemma3(out: Path, seed: int = 0) -> Path:
    """A random Gemma 3 (2-layer SigLIP tower on 56 px images, pooled to 4 image tokens; 2-layer text model)
    with the tokenizer above plus Gemma's image tokens; image parts render as `<start_of_image>`. Unlike
    LLaVA-with-CLIP, llama.cpp's convert_hf_to_gguf.py can make its mmproj (tests/vision_files.py)."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor
    try:
        from transformers import Gemma3ImageProcessorPil as ImageProcessor
    except ImportError:
        from transformers import Gemma3ImageProcessor as ImageProcessor

    template = VISION_TEMPLATE.replace("<image>", "<start_of_image>")
    tok = make_tokenizer(template, special={"boi_token": "<start_of_image>", "image_token": "<image_soft_token>",
                                            "eoi_token": "<end_of_image>"})
    processor = Gemma3Processor(ImageProcessor(size={"height": 56, "width": 56}), tok, chat_template=template,
                                image_seq_length=4)
    cfg = Gemma3Config(
        vision_config={"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": 56, "patch_size": 14},
        text_config={"model_type": "gemma3_text", "vocab_size": len(tok), "hidden_size": 64, "intermediate_size": 128,
                     "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                     "query_pre_attn_scalar": 16, "sliding_window": 512, "max_position_embeddings": 512,
                     "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                     "pad_token_id": tok.pad_token_id},
        mm_tokens_per_image=4, boi_token_index=tok.boi_token_id, eoi_token_index=tok.eoi_token_id,
        image_token_index=tok.image_token_id)
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(cfg)
    # Gemma zero-initializes the image projection: images would all look alike.
    torch.nn.init.normal_(model.model.multi_modal_projector.mm_input_projection_weight, std=cfg.initializer_range)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    # The hub's layout (vision_tower.vision_model.*), which transformers reads and llama.cpp's converter maps;
    # transformers 5 writes vision_tower.* instead.
    weights = out / "model.safetensors"
    save_file({k.replace("vision_tower.", "vision_tower.vision_model.", 1): v for k, v in load_file(weights).items()},
              weights, metadata={"format": "pt"})
    return out


def make_tiny_qwen2_audio(out: Path, seed: int = 0) -> Path:
    """A random Qwen2-Audio (1-layer Whisper-style encoder, 80 mel bins; 2-layer Qwen2) with the tokenizer above
    plus its audio tokens; audio parts render as `<|audio_bos|><|AUDIO|><|audio_eos|>` (2 s of sound: 50 tokens)."""
    import torch
    from transformers import (Qwen2AudioConfig, Qwen2AudioForConditionalGeneration, Qwen2AudioProcessor,
                              WhisperFeatureExtractor)

    template = VISION_TEMPLATE.replace("{% if p['type'] == 'image' %}<image>",
                                       "{% if p['type'] == 'audio' %}<|audio_bos|><|AUDIO|><|audio_eos|>")
    tok = make_tokenizer(template, special={"audio_token": "<|AUDIO|>", "audio_bos_token": "<|audio_bos|>",
                                            "audio_eos_token": "<|audio_eos|>"})
    processor = Qwen2AudioProcessor(WhisperFeatureExtractor(feature_size=80), tok, chat_template=template)
    cfg = Qwen2AudioConfig(
        audio_config={"model_type": "qwen2_audio_encoder", "d_model": 32, "encoder_layers": 1,
                      "encoder_attention_heads": 2, "encoder_ffn_dim": 64, "num_mel_bins": 80,
                      "max_source_positions": 1500},
        text_config=tiny_text_config(tok, "qwen2", 2048),
        audio_token_index=tok.audio_token_id)
    torch.manual_seed(seed)
    model = Qwen2AudioForConditionalGeneration(cfg)
    # At its default scale the projected audio barely moves a random model: every clip would read alike.
    torch.nn.init.normal_(model.model.multi_modal_projector.linear.weight, std=1.0)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def make_tiny_lora(out: Path, base: Path, base_name: str, seed: int = 0, rank: int = 4) -> Path:
    """A random LoRA adapter (PEFT, q/v projections; init_lora_weights=False, so it changes the output) over the
    tiny model in `base`, saved as a Hub adapter repo names its base: base_model_name_or_path = `base_name`."""
    import json

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(out)
    config = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": base_name}, indent=2))
    return out
