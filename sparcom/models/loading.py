"""Model presets and the one loader.

``load_model(name_or_path)`` takes a tiny preset name (built offline from a config with a fixed
seed), a packaged preset (a real trained model that a registry package ships, e.g.
``smollm2-135m-instruct``: ``sparcom.models.packaged``), a local directory written by ``save_pretrained``,
or a hub id; the last three take the same ``from_pretrained`` path, so a tiny model saved to disk
loads exactly as a real checkpoint would.

Which is which: the tiny presets have random weights and exist for architecture coverage and fast
tests (a finding on them means nothing); the packaged preset is a real model, the default.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from sparcom.data import load_records
from sparcom.models.packaged import PACKAGED

# ChatML, the template of the Qwen family: one format for every tiny preset.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

_SMALL = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
)
_MOE = dict(num_experts_per_tok=2)
_DEEPSEEK = dict(
    n_routed_experts=8,
    n_shared_experts=1,
    moe_intermediate_size=32,
    first_k_dense_replace=1,
    n_group=4,
    topk_group=2,
    kv_lora_rank=16,
    q_lora_rank=None,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    head_dim=8,
    v_head_dim=16,
    num_key_value_heads=4,
    **_MOE,
)

# Tiny presets: (model_type, config overrides). Every supported architecture has one, so the tests
# can check the recorder on each; conf/model/ exposes the three the product documents.
TINY_PRESETS: dict[str, tuple[str, dict]] = {
    "tiny-llama": ("llama", {}),
    "tiny-qwen2": ("qwen2", {}),
    "tiny-qwen3": ("qwen3", dict(head_dim=16)),
    "tiny-mistral": ("mistral", {}),
    "tiny-gemma": ("gemma", dict(head_dim=16, hidden_act="gelu_pytorch_tanh")),
    "tiny-gemma2": ("gemma2", dict(head_dim=16)),
    "tiny-phi3": ("phi3", {}),
    "tiny-qwen2-moe": (
        "qwen2_moe",
        dict(num_experts=8, moe_intermediate_size=32, shared_expert_intermediate_size=64, **_MOE),
    ),
    "tiny-qwen3-moe": ("qwen3_moe", dict(num_experts=8, moe_intermediate_size=32, head_dim=16, **_MOE)),
    "tiny-mixtral": ("mixtral", dict(num_local_experts=8, intermediate_size=32, **_MOE)),
    "tiny-olmoe": ("olmoe", dict(num_experts=8, intermediate_size=32, **_MOE)),
    "tiny-deepseek-v2": ("deepseek_v2", dict(topk_method="group_limited_greedy", **_DEEPSEEK)),
    "tiny-deepseek-v3": ("deepseek_v3", dict(_DEEPSEEK)),
}


@functools.lru_cache(maxsize=4)
def tiny_tokenizer(vocab_size: int = 2048):
    """A byte-level BPE tokenizer trained offline on HexaInst, with the ChatML chat template.

    Training is deterministic and takes about a second; the result is cached per process.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [text for r in load_records() for text in (r["instruction"], r["input"], r["output"]) if text]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny(preset: str, seed: int = 0, **overrides):
    """Build a tiny preset from its config with a fixed seed: returns ``(model, tokenizer)``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if preset not in TINY_PRESETS:
        raise ValueError(f"unknown tiny preset {preset!r}; expected one of {sorted(TINY_PRESETS)}")
    model_type, extra = TINY_PRESETS[preset]
    tokenizer = tiny_tokenizer()
    config = AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
        **{**_SMALL, **extra, **overrides},
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    model.name_or_path = preset
    model.config.name_or_path = preset
    return model.eval(), tokenizer


def load_model(
    name_or_path: str,
    dtype: str | torch.dtype | None = None,
    chat_template_from: str | None = None,
    seed: int = 0,
    device_map: str | dict | None = None,
    max_memory: dict | None = None,
    offload_folder: str | Path | None = None,
    **tiny_overrides,
):
    """Load ``(model, tokenizer)`` from a tiny preset name, a local directory or a hub id.

    ``chat_template_from``: where a base model's tokenizer has no chat template, borrow the one of
    this tokenizer (its instruct sibling), so base and tuned models see identical prompts.

    Models bigger than one device: ``device_map`` ("auto", or module -> device, "cpu" or "disk"),
    ``max_memory`` (device -> bytes or "20GiB") and ``offload_folder`` go to ``from_pretrained``
    (accelerate's dispatch). Recording works on any placement, offloaded layers included; editing
    weights in place (``sparcom.intervene``, ablation, steering) refuses offloaded ones
    (``check_resident``). A tiny preset takes
    only a single device (``device_map="cuda"``): save it with ``save_pretrained`` to dispatch it.
    """
    from transformers import AutoModelForCausalLM

    placement = {"device_map": device_map, "max_memory": max_memory, "offload_folder": offload_folder}
    placement = {key: value for key, value in placement.items() if value is not None}
    if placement and "device_map" not in placement:
        raise ValueError(
            f"{' and '.join(sorted(placement))} need a device_map (e.g. device_map='auto'); got none"
        )
    if name_or_path in TINY_PRESETS:
        if set(placement) - {"device_map"} or isinstance(device_map, dict) or device_map == "auto":
            raise ValueError(
                f"tiny preset {name_or_path!r} takes a single device (device_map='cpu' or 'cuda'), not "
                f"{placement}; save it with save_pretrained and load the folder to dispatch or offload it"
            )
        model, tokenizer = build_tiny(name_or_path, seed=seed, **tiny_overrides)
        model = model.to(_dtype(dtype)) if dtype else model
        return (model.to(device_map) if device_map else model), tokenizer
    if tiny_overrides:
        raise ValueError(
            f"config overrides {sorted(tiny_overrides)} apply to tiny presets only, not {name_or_path!r}"
        )
    if name_or_path.startswith("tiny-") and not Path(name_or_path).exists():
        raise ValueError(f"unknown tiny preset {name_or_path!r}; expected one of {sorted(TINY_PRESETS)}")
    tokenizer = load_tokenizer(name_or_path, chat_template_from)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(
        _source(name_or_path), dtype=_dtype(dtype) if dtype else "auto", **placement
    )
    if name_or_path in PACKAGED:  # snapshots and checkpoints name the preset, not the cache folder
        model.name_or_path = model.config.name_or_path = name_or_path
    return model.eval(), tokenizer


def _source(name_or_path: str) -> str:
    """What ``from_pretrained`` reads: a packaged preset's dequantised copy, else the name itself."""
    from sparcom.models.packaged import materialised

    return str(materialised(name_or_path)) if name_or_path in PACKAGED else name_or_path


def check_resident(model: torch.nn.Module, purpose: str) -> None:
    """Refuse to edit weights in place when some are offloaded. accelerate keeps an offloaded
    module's weights on "meta" between forwards and reloads them from its offload store (the
    offload folder, or CPU memory beside a GPU) on every call, so an edit would silently not apply."""
    for name, parameter in model.named_parameters():
        if parameter.device.type == "meta":
            raise ValueError(
                f"{purpose} edits weights in place, but {name} is offloaded (device_map put it on 'disk', "
                "or on 'cpu' beside a GPU), where edits do not apply; load the model with a device_map "
                "that keeps every layer on a device"
            )


def load_tokenizer(name_or_path: str, chat_template_from: str | None = None):
    """The tokenizer alone (for analyses that need no weights), by the same rules as ``load_model``."""
    from transformers import AutoTokenizer

    if name_or_path in TINY_PRESETS:
        return tiny_tokenizer()
    tokenizer = AutoTokenizer.from_pretrained(_source(name_or_path))
    if not tokenizer.chat_template and chat_template_from:
        tokenizer.chat_template = AutoTokenizer.from_pretrained(chat_template_from).chat_template
    return tokenizer


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in ("auto", None):
        return torch.float32
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; expected e.g. float32, bfloat16, float16")
    return resolved
