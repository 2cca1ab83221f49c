"""Tiny random targets, tokenizer and DSpark drafters that the tests build themselves.

No model hub is reachable, so every model here is made from a seed in a few
seconds: a byte-level BPE tokenizer (vocab 384, with a chat template), Qwen3
and Llama targets (4 layers, hidden 64, head_dim 32, GQA), and drafters of
every head type. ``make_oracle_pair`` builds the pair whose drafts are exactly
the target's greedy tokens (see its docstring).
"""

from __future__ import annotations

import json
import os

import torch

from vllm_dspark.checkpoint import build_draft_config, save_drafter
from vllm_dspark.config import DSparkConfig
from vllm_dspark.model.drafter import DSparkDrafter

VOCAB = 384
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|mask|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Speculative decoding drafts tokens and verifies them with the target model. ",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n",
    "Once upon a time there was a small model that wanted to run fast on a CPU. ",
    "Question: what is 12 times 7? Answer: 84. Question: what is 9 plus 10? Answer: 19. ",
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor. ",
]


def make_tokenizer(path: str) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
        bos_token=None, unk_token=None,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)


def _small(family: str) -> dict:
    common = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=1024,
        rms_norm_eps=1e-6, tie_word_embeddings=False, eos_token_id=0, bos_token_id=0,
        pad_token_id=0,
    )
    if family == "llama":
        return dict(common, rope_theta=10000.0)
    return dict(common, rope_theta=1_000_000.0)


def make_target(path: str, family: str = "qwen3", seed: int = 0, scale: float = 1.0) -> str:
    """A random tiny target; ``scale`` multiplies the LM head (sharper distributions)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    cfg_cls, model_cls = {
        "qwen3": (Qwen3Config, Qwen3ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)
    }[family]
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**_small(family)))
    with torch.no_grad():
        for p in model.parameters():  # wider than HF's 0.02 init: less flat logits
            if p.dim() == 2:
                p.normal_(0, 0.2)
        model.lm_head.weight.mul_(scale)
    model = model.to(torch.float32)
    model.save_pretrained(path)
    make_tokenizer(path)
    return path


def target_config(path: str) -> dict:
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


def make_drafter(
    target_path: str,
    path: str,
    *,
    head_type: str = "vanilla",
    markov_rank: int = 16,
    block_size: int = 4,
    target_layer_ids=(-1, 1, 2),
    confidence: bool = True,
    seed: int = 1,
    num_layers: int = 2,
) -> DSparkDrafter:
    cfg = build_draft_config(
        target_config(target_path), num_hidden_layers=num_layers,
        target_layer_ids=list(target_layer_ids), block_size=block_size,
        mask_token_id=SPECIALS.index("<|mask|>"), markov_rank=markov_rank,
        markov_head_type=head_type, enable_confidence_head=confidence,
    )
    torch.manual_seed(seed)
    drafter = DSparkDrafter(DSparkConfig.from_dict(cfg))
    with torch.no_grad():
        for p in drafter.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.1)
    save_drafter(drafter, path, cfg)
    return drafter


@torch.no_grad()
def bigram_logits(target_path: str) -> torch.Tensor:
    """[V, V]: next-token logits of each single token; exact for a zero-attention target."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(target_path, torch_dtype=torch.float32)
    ids = torch.arange(VOCAB)[:, None]
    return model(input_ids=ids).logits[:, -1].float()


def make_oracle_pair(
    root: str, family: str = "qwen3", corrupt_fraction: float = 0.0, seed: int = 0,
    head_type: str = "vanilla", scale: float = 1.0,
) -> tuple[str, str]:
    """A bigram target and a drafter that proposes exactly its next tokens.

    Zeroing every attention output projection makes the target a bigram model:
    each position's state depends on its own token only, so next-token logits
    are a V x V table L[prev]. The drafter's final norm is zero (backbone logits
    vanish) and its Markov head has rank V with W1 = I and W2 = Lᵀ, so its
    bias after token ``prev`` is L[prev]: greedy drafts equal the target's
    greedy tokens and, at T > 0, its q equals the target's p.
    ``corrupt_fraction`` of the rows get a shuffled table, so those transitions
    are drafted wrong and rejected.
    """
    target = os.path.join(root, f"{family}-bigram-target-s{scale:g}")
    if not os.path.isdir(target):
        make_target(target, family, seed=seed, scale=scale)
        from safetensors.torch import load_file, save_file

        weights_file = os.path.join(target, "model.safetensors")
        state = load_file(weights_file)
        for name in state:
            if name.endswith("self_attn.o_proj.weight"):
                state[name] = torch.zeros_like(state[name])
        save_file(state, weights_file, metadata={"format": "pt"})
    table = bigram_logits(target)
    tag = f"{head_type}-c{corrupt_fraction:g}-s{scale:g}"
    draft = os.path.join(root, f"{family}-oracle-draft-{tag}")
    drafter = make_drafter(target, draft, head_type=head_type, markov_rank=VOCAB,
                           confidence=True, seed=seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    bad_rows = torch.randperm(VOCAB, generator=g)[: int(corrupt_fraction * VOCAB)]
    table = table.clone()
    for r in bad_rows.tolist():
        table[r] = table[r][torch.randperm(VOCAB, generator=g)]
    with torch.no_grad():
        drafter.norm.weight.zero_()
        drafter.markov_head.markov_w1.weight.copy_(torch.eye(VOCAB))
        drafter.markov_head.markov_w2.weight.copy_(table.T)
        if head_type != "vanilla":
            raise ValueError("the oracle pair uses the vanilla head")
    cfg_path = os.path.join(draft, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    save_drafter(drafter, draft, cfg)
    return target, draft
