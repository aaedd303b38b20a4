"""HybridQuantGPT v6.1 for OpenAI Parameter Golf, re-implemented from its specification.

Train (8xH100):  torchrun --standalone --nproc_per_node=8 train_gpt.py
Train (1 GPU):   python train_gpt.py --preset 3090
Smoke (CPU):     python train_gpt.py --preset smoke
Evaluate:        python train_gpt.py --eval-only runs/<run>/model.hqa

Sections, in the order data flows: config, model, training, quantization and artifact, evaluation, main.
Modules: hq_data.py (shards, the training stream), hq_dist.py (ranks, logging), fused_kernels.py (the model's
kernels), hq_optim.py (the optimizer), hq_artifact.py (the artifact's container), hq_adapt.py (TTT's and SLOT's
updates), hq_gptq.py (GPTQ's export). Every hyperparameter is a field of Config, settable as an environment
variable (MATRIX_LR) and a flag (--matrix-lr); precedence: preset < environment < flag.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import io
import json
import math
import os
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import fused_kernels as fast  # the fast path: each of the model's ops below, as a kernel where one applies
import hq_artifact  # the artifact's container: byte format, checks that need no model, compression
import hq_gptq  # GPTQ's error-compensated levels and the calibration Hessians they need
from hq_data import TrainLoader, check_shards, load_val_tokens, shard_files  # shards, the training stream
from hq_adapt import fit_slot_delta, slot_adam_step, ttt_update  # SLOT's offset fit and TTT's weight update
import hq_doc_ttt  # per-document score-first LoRA TTT (TTT_LORA_RANK > 0)
from hq_dist import (RUN_FILES, Dist, InputError, Log, atomic_torch_save, atomic_write,  # ranks, logging, writes,
                     claim_run_dir, init_dist)  # run folders
from hq_optim import Optimizers  # Parallel Muon for the matrices + AdamW for the rest

# ----------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------


@dataclass
class Config:
    # paths and identity
    data_path: str = "./data/datasets/fineweb10B_sp1024"
    tokenizer_path: str = "./data/tokenizers/fineweb_1024_bpe.model"
    run_dir: str = ""  # empty: runs/<preset>_s<seed>
    seed: int = 1337
    # model (spec §1.1)
    vocab_size: int = 1024
    num_layers: int = 11
    model_dim: int = 512
    num_heads: int = 8
    num_kv_heads: int = 4
    mlp_mult: float = 4.0
    rope_dims: int = 16
    bigram_vocab: int = 2048
    bigram_dim: int = 128
    ve_dim: int = 128
    ve_layers: str = "9,10"
    qk_gain_init: float = 2.0
    logit_softcap: float = 15.0
    # candidates of PR #1204 (off by default): from block PARALLEL_FROM on, attention and MLP read separate residual
    # lanes and write both through learned weights; the consecutive RECUR_LAYERS run a second time once RECUR_START
    # of training (a fraction of the clock, or of ITERATIONS) has passed, since the extra blocks slow every step
    parallel_from: int = 0
    recur_layers: str = ""
    recur_start: float = 0.5
    # quantizer alphabet per matrix group, trained with QAT and stored as is (spec §2.6, §3): 5 is pentanary
    # {-2..2}; 2^k is int-k. Bigger alphabets cost artifact bytes and buy a less constrained model.
    qk_alphabet: int = 64
    vo_alphabet: int = 32
    mlp_up_alphabet: int = 5
    mlp_down_alphabet: int = 16
    residual_dtype: str = "bf16"  # bf16 | fp32: the residual stream's dtype on GPUs (CPU runs fp32 throughout)
    # batch and schedule (spec §2.2, §2.5)
    train_batch_tokens: int = 786432
    train_seq_len: int = 2048
    micro_batch_seqs: int = 128  # at most this many sequences per rank per forward; grad accumulation does the rest
    iterations: int = 9000
    warmup_steps: int = 180
    warmdown_iters: int = 3500
    max_wallclock_seconds: float = 600.0  # 0: schedule by iterations
    # 1: the lr and Muon-momentum warm-ups last the same fraction of the clock (WARMUP_STEPS/ITERATIONS) as the
    # warm-down does, so a short run keeps the full run's schedule shape; 0: they last WARMUP_STEPS steps
    warmup_by_clock: int = 0
    # optimizer (spec §2.3-2.4)
    matrix_lr: float = 0.025
    tied_embed_lr: float = 0.035
    scalar_lr: float = 0.025
    muon_momentum: float = 0.99
    muon_momentum_warmup_start: float = 0.92
    muon_momentum_warmup_steps: int = 1500
    muon_backend_steps: int = 5
    muon_wd: float = 0.04
    adam_wd: float = 0.04
    grad_clip_norm: float = 0.3
    # weight averaging (spec §2.7)
    final_weights: str = "swa"  # swa | ema | live
    swa_every: int = 50
    swa_start_scale: float = 0.2
    ema_decay: float = 0.997
    # runtime
    compile: int = 1
    compile_warmup_steps: int = 3
    fused_kernels: int = 1  # CUDA + Triton: the hand-written kernels of fused_kernels.py (0: inductor alone)
    cutlass_mlp: int = 1  # Hopper: the MLP's two kernels from cutlass_mlp.cu, built with nvcc (0: Triton's)
    log_every: int = 200
    val_every: int = 0
    save_every: int = 0
    # artifact (spec §3-4)
    # the embedding tables are trained without QAT; their storage: 16 fp16, else int-k per row after training
    embed_bits: int = 16  # tok_emb: 16, 8 or 6 (spec V62: 6)
    table_bits: int = 16  # the BigramHash and value-embedding tables: 16 or 8
    compressor: str = "lzma"  # lzma | zstd
    # QAT=0 trains float weights that only the export quantizes. GPTQ=1 exports error-compensated levels (at the
    # same scales) from GPTQ_CALIB_SEQS training sequences; it runs on the training clock, GPTQ_RESERVE_S of it
    qat: int = 1
    gptq: int = 0
    gptq_calib_seqs: int = 64
    gptq_reserve_s: float = 8.0
    # evaluation (spec §5)
    eval_seq_len: int = 1024
    eval_stride: int = 64
    eval_batch_seqs: int = 32
    eval_budget_s: float = 600.0
    ttt: int = 1  # legal score-first TTT is the default score (TTT=0: sliding only)
    ttt_optimizer: str = "sgd"  # sgd | muon
    ttt_lr: float = 0.002
    ttt_epochs: int = 3
    ttt_chunk_tokens: int = 32768
    ttt_momentum: float = 0.9
    ttt_freeze_blocks: int = 0
    ttt_grad_clip: float = 1.0
    # TTT_LORA_RANK > 0: per-document LoRA TTT (hq_doc_ttt.py) instead of the chunk TTT above: each document
    # gets fresh rank-r adapters on TTT_LORA_SITES, and each TTT_DOC_CHUNK of its targets is scored, then trained on
    ttt_lora_rank: int = 0
    ttt_lora_sites: str = "q,v,head"  # some of q,k,v,o,up,down (each block), head
    ttt_lora_lr: float = 0.001  # Adam (betas 0.9/0.95), one step per chunk
    ttt_doc_chunk: int = 48
    ttt_doc_batch: int = 64  # documents adapted side by side
    slot: str = "off"  # off | causal | reference (reference is NOT record-legal)
    slot_steps: int = 20
    slot_lr: float = 0.1
    slot_lr_min: float = 0.001


PRESETS: dict[str, dict] = {
    # the 8xH100 record recipe: the seed's, plus what won its A/B on proxy100 (README, "Score experiments")
    "h100": dict(eval_seq_len=2048, mlp_up_alphabet=16, mlp_mult=3.5, warmup_by_clock=1, vo_alphabet=64,
                 bigram_vocab=3072),
    "v61": {},  # the seed's recipe exactly (spec §2-§5): Config's defaults
    "3090": dict(  # unlimited-compute recipe of PR #1123 (spec §7.1): 10k iterations, no clock
        train_batch_tokens=524288, train_seq_len=1024, micro_batch_seqs=16, iterations=10000,
        warmup_steps=200, warmdown_iters=1750, max_wallclock_seconds=0.0, matrix_lr=0.01,
        tied_embed_lr=0.0125, scalar_lr=0.01, muon_momentum=0.95, muon_momentum_warmup_start=0.85,
        muon_momentum_warmup_steps=500, muon_wd=0.0, adam_wd=0.0, grad_clip_norm=1.0, val_every=500,
        save_every=500, ttt_freeze_blocks=2),
    "smoke": dict(  # same code paths, sized for a 2-core CPU and the bundled sample
        data_path="./data/datasets/fineweb_tiny_sp1024", num_layers=4, model_dim=64, num_heads=4,
        num_kv_heads=2, mlp_mult=2.0, bigram_vocab=256, bigram_dim=16, ve_dim=16, ve_layers="2,3",
        train_batch_tokens=4096, train_seq_len=128, micro_batch_seqs=16, iterations=30, warmup_steps=5,
        warmdown_iters=10, max_wallclock_seconds=0.0, muon_momentum_warmup_steps=10, swa_every=2,
        swa_start_scale=0.5, compile=0, log_every=5, save_every=15, eval_seq_len=128, eval_stride=64,
        eval_batch_seqs=64, ttt=1, ttt_chunk_tokens=8192, ttt_epochs=1, slot="causal", slot_steps=3),
}


def _parse_value(text: str, kind: type):
    if kind is not int:
        return kind(text)
    v = float(text)  # accepts 1e5; refuses 1.5
    if v != int(v):
        raise ValueError(text)
    return int(v)


def explicit(name: str, flags: dict | None, env: dict | None = None) -> list[tuple[str, str]]:
    """(key, text) of each setting of a field, in precedence order: environment variable, then flag."""
    env = os.environ if env is None else env
    return [(k, str(src[k])) for src, k in ((env, name.upper()), (flags or {}, name)) if src.get(k) is not None]


def build_config(preset: str, flags: dict | None = None, env: dict | None = None) -> Config:
    if preset not in PRESETS:
        raise InputError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    cfg = Config(**PRESETS[preset])
    for f in fields(Config):
        kind = type(getattr(cfg, f.name))
        for key, text in explicit(f.name, flags, env):
            try:
                setattr(cfg, f.name, _parse_value(text, kind))
            except (ValueError, OverflowError):
                raise InputError(f"{key}={text!r} is not a valid {kind.__name__}") from None
    if not cfg.run_dir:
        cfg.run_dir = f"runs/{preset}_s{cfg.seed}"
    check_config(cfg)
    return cfg


def check_config(cfg: Config) -> None:
    def need(ok: bool, msg: str):
        if not ok:
            raise InputError(msg)
    for k in ("vocab_size", "num_layers", "model_dim", "num_heads", "num_kv_heads", "bigram_dim", "ve_dim",
              "train_batch_tokens", "train_seq_len", "micro_batch_seqs", "iterations", "muon_backend_steps",
              "eval_seq_len", "eval_batch_seqs", "ttt_chunk_tokens", "mlp_mult", "logit_softcap", "gptq_calib_seqs"):
        need(getattr(cfg, k) > 0, f"{k.upper()} must be positive (got {getattr(cfg, k)})")
    need(cfg.bigram_vocab >= 2, "BIGRAM_VOCAB must be at least 2")
    for k in (f.name for f in fields(Config) if f.type == "float"):  # rates, decays, clips, seconds: NaN/inf/< 0 mean nothing
        v = getattr(cfg, k)
        need(math.isfinite(v) or (k == "eval_budget_s" and v > 0), f"{k.upper()} must be finite (got {v})")
        need(v >= 0 or k == "qk_gain_init", f"{k.upper()} must not be negative (got {v})")
    for k in ("muon_momentum", "muon_momentum_warmup_start", "ema_decay", "ttt_momentum"):
        need(getattr(cfg, k) <= 1, f"{k.upper()} must be in [0, 1] (got {getattr(cfg, k)})")
    for name, ids in (("VE_LAYERS", ve_layer_ids), ("RECUR_LAYERS", recur_layer_ids)):
        try:
            ids(cfg)
        except ValueError:
            raise InputError(f"{name} {getattr(cfg, name.lower())!r} is not a comma-separated list of layers") from None
    rec = recur_layer_ids(cfg)
    need(not rec or rec == list(range(rec[0], rec[-1] + 1)) and 0 <= rec[0] and rec[-1] < cfg.num_layers,
         f"RECUR_LAYERS {cfg.recur_layers!r} must be consecutive ascending layers within 0..{cfg.num_layers - 1}")
    need(cfg.recur_start <= 1, f"RECUR_START must be in [0, 1] (got {cfg.recur_start})")
    need(0 <= cfg.parallel_from < cfg.num_layers, f"PARALLEL_FROM must be in 0..{cfg.num_layers - 1} (0: off)")
    need(cfg.model_dim % cfg.num_heads == 0, "MODEL_DIM must be a multiple of NUM_HEADS")
    need(cfg.num_heads % cfg.num_kv_heads == 0, "NUM_HEADS must be a multiple of NUM_KV_HEADS")
    need(cfg.rope_dims % 2 == 0 and cfg.rope_dims <= cfg.model_dim // cfg.num_heads, "ROPE_DIMS must be even and <= head dim")
    need(all(0 <= i < cfg.num_layers for i in ve_layer_ids(cfg)), f"VE_LAYERS {cfg.ve_layers!r} outside 0..{cfg.num_layers - 1}")
    need(cfg.train_batch_tokens % cfg.train_seq_len == 0, "TRAIN_BATCH_TOKENS must be a multiple of TRAIN_SEQ_LEN")
    need(cfg.residual_dtype in ("bf16", "fp32"), "RESIDUAL_DTYPE must be bf16 or fp32")
    need(cfg.final_weights in ("swa", "ema", "live"), "FINAL_WEIGHTS must be swa, ema or live")
    need(cfg.compressor in ("lzma", "zstd"), "COMPRESSOR must be lzma or zstd")
    need(cfg.embed_bits in (16, 8, 6), "EMBED_BITS must be 16 (fp16), 8 or 6")
    need(cfg.table_bits in (16, 8), "TABLE_BITS must be 16 (fp16) or 8")
    for k in ("qk_alphabet", "vo_alphabet", "mlp_up_alphabet", "mlp_down_alphabet"):
        need(getattr(cfg, k) in ALPHABETS, f"{k.upper()} must be one of {', '.join(map(str, ALPHABETS))} "
             f"(5: pentanary, 2^k: int-k; got {getattr(cfg, k)})")
    for k in ("warmup_by_clock", "qat", "gptq"):
        need(getattr(cfg, k) in (0, 1), f"{k.upper()} must be 0 or 1 (got {getattr(cfg, k)})")
    need(not cfg.gptq or cfg.max_wallclock_seconds == 0 or cfg.gptq_reserve_s < cfg.max_wallclock_seconds,
         "GPTQ_RESERVE_S must be less than MAX_WALLCLOCK_SECONDS")
    need(cfg.slot in ("off", "causal", "reference"), "SLOT must be off, causal or reference")
    need(cfg.ttt_optimizer in ("sgd", "muon"), "TTT_OPTIMIZER must be sgd or muon")
    need(cfg.ttt_lora_rank >= 0 and cfg.ttt_doc_batch > 0 and cfg.ttt_doc_chunk > 0 and
         (cfg.ttt_lora_rank == 0 or cfg.ttt_doc_chunk <= cfg.eval_seq_len),
         "TTT_LORA_RANK must be >= 0, TTT_DOC_BATCH > 0, TTT_DOC_CHUNK in 1..EVAL_SEQ_LEN")
    sites = cfg.ttt_lora_sites.split(",")
    need(bool(sites) and set(sites) <= set(hq_doc_ttt.SITES), f"TTT_LORA_SITES must be some of {','.join(hq_doc_ttt.SITES)}")
    need(0 < cfg.eval_stride <= cfg.eval_seq_len, "EVAL_STRIDE must be in 1..EVAL_SEQ_LEN")
    need(cfg.iterations > 0 and 0 <= cfg.warmdown_iters <= cfg.iterations, "need 0 <= WARMDOWN_ITERS <= ITERATIONS")


def check_tokenizer(cfg: Config) -> None:
    """The bpb needs the tokenizer: a missing or mismatched one must stop the run before training, not after."""
    path = cfg.tokenizer_path
    if not os.path.isfile(path):
        raise InputError(f"TOKENIZER_PATH {path}: {'not a file' if os.path.exists(path) else 'no such file'}")
    import sentencepiece as spm
    try:
        n = spm.SentencePieceProcessor(model_file=path).vocab_size()
    except Exception as e:
        raise InputError(f"TOKENIZER_PATH {path}: cannot load it as a SentencePiece model ({e})") from None
    if n != cfg.vocab_size:
        raise InputError(f"TOKENIZER_PATH {path}: {n} tokens, but VOCAB_SIZE is {cfg.vocab_size}")


def ve_layer_ids(cfg: Config) -> list[int]:
    return [int(s) for s in cfg.ve_layers.split(",") if s.strip()]


def recur_layer_ids(cfg: Config) -> list[int]:
    return [int(s) for s in cfg.recur_layers.split(",") if s.strip()]


MODEL_FIELDS = ("vocab_size", "num_layers", "model_dim", "num_heads", "num_kv_heads", "mlp_mult", "rope_dims",
                "bigram_vocab", "bigram_dim", "ve_dim", "ve_layers", "qk_gain_init", "logit_softcap", "residual_dtype",
                "qk_alphabet", "vo_alphabet", "mlp_up_alphabet", "mlp_down_alphabet", "parallel_from", "recur_layers")
MODEL_FIELDS_ADDED = {"residual_dtype": "fp32", "qk_alphabet": 64, "vo_alphabet": 32, "mlp_up_alphabet": 5,
                      "mlp_down_alphabet": 16, "parallel_from": 0,
                      "recur_layers": ""}  # what artifacts written before a field existed were made with
# what an artifact's scores depend on besides its weights: recorded in it; --eval-only uses them unless set
EVAL_FIELDS = ("eval_seq_len", "eval_stride", "ttt", "ttt_optimizer", "ttt_lr", "ttt_epochs", "ttt_chunk_tokens",
               "ttt_momentum", "ttt_freeze_blocks", "ttt_grad_clip", "slot", "slot_steps", "slot_lr", "slot_lr_min",
               "ttt_lora_rank", "ttt_lora_sites", "ttt_lora_lr", "ttt_doc_chunk", "ttt_doc_batch")

# ----------------------------------------------------------------------------------------------------
# Model (spec §1): QAT linears, partial RoPE, XSA, value residual/embeddings, U-Net skips
# ----------------------------------------------------------------------------------------------------

PENT, INT4, INT5, INT6 = 5, 16, 32, 64  # quantizer alphabets; 5 = pentanary {-2..2}
ALPHABET_NAMES = {PENT: "pent", 8: "int3", INT4: "int4", INT5: "int5", INT6: "int6", 128: "int7", 256: "int8"}
ALPHABETS = tuple(ALPHABET_NAMES)


def quantize_rows(w: torch.Tensor, alphabet: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-row quantizer shared by QAT and export (spec §2.6, §3): integer levels and fp16 scale.
    intN: levels round(w/absmax*h) clamped to [-h, h-1]; pentanary: thresholds 0.7/1.4*mean|w|, LS scale."""
    w = w.float()
    if alphabet == PENT:
        a = w.abs()
        mu = a.mean(1, keepdim=True)
        q = torch.sign(w) * ((a > 0.7 * mu).float() + (a > 1.4 * mu).float())
        s = (w * q).sum(1, keepdim=True) / (q * q).sum(1, keepdim=True).clamp_min(1e-8)
    else:
        h = alphabet // 2
        s = w.abs().amax(1, keepdim=True).clamp_min(1e-5)
        q = torch.clamp(torch.round(w / s * h), -h, h - 1)
    return q, s.half()


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, alphabet: int) -> torch.Tensor:
    # The same float ops in training (QAT) and after loading the artifact, so both see identical weights.
    return q * (scale.float() / (1 if alphabet == PENT else alphabet // 2))


class QATLinear(nn.Module):
    """Bias-free linear whose forward sees the quantized weight (straight-through gradient).
    `quantized` is off once the weights already are dequantized artifact values (re-quantizing is not
    idempotent) and during TTT, which adapts the dequantized weights directly."""

    def __init__(self, in_features: int, out_features: int, alphabet: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.alphabet = alphabet
        self.quantized = True

    def weight_as(self, dtype: torch.dtype, row_scale: torch.Tensor | None = None) -> torch.Tensor:
        """The weight the matmul sees, optionally times a per-output-row scale: scale * (W x) as (scale * W) x
        costs a pass over the weight instead of two over the activations (one each way)."""
        w = self.weight
        if self.quantized:  # value: exactly the dequantized weight; gradient: straight through to w
            w = dequantize_rows(*quantize_rows(w.detach(), self.alphabet), self.alphabet) + (w - w.detach())
        if row_scale is not None:
            w = w * row_scale.float()[:, None]
        return w.to(dtype)

    def forward(self, x: torch.Tensor, row_scale: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear(x, self.weight_as(x.dtype, row_scale))


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),), eps=1e-6)


def rope_tables(seq_len: int, dims: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 10000.0 ** (-torch.arange(0, dims, 2, dtype=torch.float32, device=device) / dims)
    ang = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
    return ang.cos()[None, :, None, :], ang.sin()[None, :, None, :]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # Rotates the first `dims` of each head (spec §1.3 sign convention); the rest pass through.
    half = cos.size(-1)
    x1, x2, rest = x[..., :half], x[..., half:2 * half], x[..., 2 * half:]
    c, s = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * c + x2 * s, x2 * c - x1 * s, rest), dim=-1)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q [B,T,H,D], k/v [B,T,KV,D] -> [B,T,H,D]; GQA without materializing repeated K/V."""
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       is_causal=True, enable_gqa=True)
    return y.transpose(1, 2)


def xsa(y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """XSA: drop from each head's output its component along its own value vector.
    y [B,T,KV,G,D] (G query heads share a KV head), v [B,T,KV,D]."""
    vn = F.normalize(v.to(y.dtype), dim=-1).unsqueeze(3)
    return y - (y * vn).sum(-1, keepdim=True) * vn


def xsa_proj(y: torch.Tensor, v: torch.Tensor, proj: QATLinear, out_scale=None) -> torch.Tensor:
    """proj(xsa(y, v)) -> [B,T,dim]."""
    return proj(xsa(y, v).reshape(*y.shape[:2], -1), out_scale)


def attn_inputs(qkv, cos, sin, gain, ve, v0, lam, heads: int, kv_heads: int):
    """q, k, v [B,T,n,D] from the q/k/v matmul's output: q and k RMS-normalized and rotated, q scaled by its
    per-head gain; v plus the value embedding where the layer has one, then mixed with layer 0's values v0 by
    lam (the value residual) where v0 is given."""
    B, T, C = qkv.shape
    D = C // (heads + 2 * kv_heads)
    q, k, v = qkv.view(B, T, -1, D).split((heads, kv_heads, kv_heads), 2)
    v = v if ve is None else v + ve.view_as(v)
    v = v if v0 is None else lam[0] * v0 + lam[1] * v
    q, k = apply_rope(rms_norm(q), cos, sin), apply_rope(rms_norm(k), cos, sin)
    return q * gain.to(q.dtype)[None, None, :, None], k, v


class Attention(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.h, self.kv, self.hd = cfg.num_heads, cfg.num_kv_heads, cfg.model_dim // cfg.num_heads
        dim, kv_dim = cfg.model_dim, self.kv * self.hd
        self.c_q, self.c_k = QATLinear(dim, dim, cfg.qk_alphabet), QATLinear(dim, kv_dim, cfg.qk_alphabet)
        self.c_v, self.proj = QATLinear(dim, kv_dim, cfg.vo_alphabet), QATLinear(dim, dim, cfg.vo_alphabet)
        self.q_gain = nn.Parameter(torch.full((self.h,), cfg.qk_gain_init))
        self.vr_lambda = nn.Parameter(torch.tensor([0.5, 0.5]))  # value residual (unused by layer 0)
        self.fused = bool(cfg.fused_kernels)

    def forward(self, x, rope, v0, ve, out_scale=None):
        B, T, _ = x.shape
        # One matmul for q, k and v: one read of x, and one gradient matmul backward instead of three plus a sum.
        w = torch.cat([lin.weight_as(x.dtype) for lin in (self.c_q, self.c_k, self.c_v)])
        qkv = F.linear(x, w)
        ve = None if ve is None else ve.to(qkv.dtype)
        lam = None if v0 is None else self.vr_lambda.to(qkv.dtype)
        # v comes back twice, for the attention and for XSA: a fused kernel sums their gradients as it reads them
        q, k, v, v_xsa = fast.attn_inputs(qkv, *rope, self.q_gain, ve, v0, lam, self.h, self.kv,
                                          on=self.fused, plain=attn_inputs)
        y = fast.attention(q, k, v.to(q.dtype), plain=causal_attention).view(B, T, self.kv, self.h // self.kv, self.hd)
        return fast.xsa_proj(y, v_xsa, self.proj, out_scale, on=self.fused, plain=xsa_proj), v  # layer 0's v: v0


class MLP(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        hidden = math.ceil(cfg.mlp_mult * cfg.model_dim / 64) * 64
        self.up = QATLinear(cfg.model_dim, hidden, cfg.mlp_up_alphabet)
        self.down = QATLinear(hidden, cfg.model_dim, cfg.mlp_down_alphabet)
        self.fused = bool(cfg.fused_kernels)

    @staticmethod
    def plain(x, up: QATLinear, down: QATLinear, out_scale=None):
        return down(F.leaky_relu(up(x), 0.5).square(), out_scale)

    def forward(self, x, out_scale=None):
        return fast.mlp(x, self.up, self.down, out_scale, on=self.fused, plain=self.plain)


class Block(nn.Module):
    def __init__(self, cfg: Config, layer: int):
        super().__init__()
        dim = cfg.model_dim
        self.ln_scale = 1.0 / math.sqrt(layer + 1)
        self.attn, self.mlp = Attention(cfg), MLP(cfg)
        self.attn_scale, self.mlp_scale = nn.Parameter(torch.ones(dim)), nn.Parameter(torch.ones(dim))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(dim), torch.zeros(dim))))
        self.lanes = 0 < cfg.parallel_from <= layer
        if self.lanes:  # attn->attn lane, attn->mlp lane, mlp->attn lane, mlp->mlp lane; all 1: a plain block
            self.lane_weights = nn.Parameter(torch.ones(4))

    def forward(self, x, x0, rope, v0, ve, xm=None):
        """x: the residual stream (with lanes: attention's lane; xm: the MLP's lane, else None)."""
        if xm is not None and not self.lanes:  # a plain block after lanes (in recurrence) reads them merged
            x, xm = 0.5 * (x + xm), None
        mix, dt = self.resid_mix.to(x.dtype), x.dtype  # fp32 scales would promote a bf16 stream back to fp32
        x = mix[0] * x + mix[1] * x0
        a, v = self.attn(rms_norm(x) * self.ln_scale, rope, v0, ve, self.attn_scale)
        if not self.lanes:
            x = x + a.to(dt)
            return x + self.mlp(rms_norm(x) * self.ln_scale, self.mlp_scale).to(dt), v, None
        w, a = self.lane_weights.to(dt), a.to(dt)
        xm = x if xm is None else mix[0] * xm + mix[1] * x0  # the first such block forks the stream
        x, xm = x + w[0] * a, xm + w[1] * a
        m = self.mlp(rms_norm(xm) * self.ln_scale, self.mlp_scale).to(dt)
        return x + w[2] * m, v, xm + w[3] * m


class GPT(nn.Module):
    BOS_ID = 1

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        dim, kv_dim = cfg.model_dim, cfg.num_kv_heads * (cfg.model_dim // cfg.num_heads)
        self.tok_emb = nn.Embedding(cfg.vocab_size, dim)
        self.bigram_embed = nn.Embedding(cfg.bigram_vocab, cfg.bigram_dim)
        self.bigram_proj = nn.Linear(cfg.bigram_dim, dim, bias=False)
        self.bigram_scale = nn.Parameter(torch.tensor(0.05))
        self.smear_gate = nn.Parameter(torch.zeros(dim))
        self.ve_embed = nn.Embedding(cfg.vocab_size, cfg.ve_dim)
        self.ve_proj = nn.Linear(cfg.ve_dim, kv_dim, bias=False)
        self.ve_scale = nn.Parameter(torch.tensor(0.1))
        self.ve_layers = ve_layer_ids(cfg)
        self.ve_layer_scales = nn.Parameter(torch.ones(len(self.ve_layers)))
        self.recur = recur_layer_ids(cfg)
        self.recur_active = bool(self.recur)  # training turns it on at RECUR_START; a loaded model runs as exported
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.n_enc = cfg.num_layers // 2
        self.skip_weights = nn.Parameter(torch.full((min(self.n_enc, cfg.num_layers - self.n_enc), dim), 0.1))
        # Tables as buffers: computed inside the compiled graph, cos/sin/pow ran per element in every
        # q/k kernel (docs/performance.md). Not in the state dict, so not in the artifact.
        cos, sin = rope_tables(max(cfg.train_seq_len, cfg.eval_seq_len), cfg.rope_dims, "cpu")
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        nn.init.normal_(self.tok_emb.weight, std=0.005)
        # The spec zero-inits both bigram table and projection; then neither ever gets a gradient
        # (each one's gradient is a product with the other), so the table starts small instead.
        nn.init.normal_(self.bigram_embed.weight, std=0.01)
        nn.init.zeros_(self.bigram_proj.weight)
        nn.init.normal_(self.ve_embed.weight, std=0.01)
        nn.init.zeros_(self.ve_proj.weight)
        for b in self.blocks:
            for lin in (b.attn.c_q, b.attn.c_k, b.attn.c_v, b.mlp.up):
                nn.init.orthogonal_(lin.weight)
            nn.init.zeros_(b.attn.proj.weight)
            nn.init.zeros_(b.mlp.down.weight)

    def set_quantized(self, on: bool) -> None:
        for m in self.modules():
            if isinstance(m, QATLinear):
                m.quantized = on

    def hidden(self, ids: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden states [B,T,dim] (before the tied output projection)."""
        cfg = self.cfg
        prev = F.pad(ids[:, :-1], (1, 0))
        bigram_ids = torch.bitwise_xor(36313 * ids, 27191 * prev) % (cfg.bigram_vocab - 1)
        bigram_ids[:, 0] = cfg.bigram_vocab - 1
        x = self.tok_emb(ids) + self.bigram_scale * self.bigram_proj(self.bigram_embed(bigram_ids))
        # The stream between blocks is memory-bound traffic: bf16 halves it (RESIDUAL_DTYPE).
        x = rms_norm(x).to(torch.bfloat16 if ids.is_cuda and cfg.residual_dtype == "bf16" else torch.float32)
        # SmearGate: blend in the previous position; not across a document start (BOS), and x_{-1} = 0.
        g = torch.sigmoid(self.smear_gate).to(x.dtype) * (ids != self.BOS_ID).unsqueeze(-1).to(x.dtype)
        x = (1 - g) * x + g * F.pad(x[:, :-1], (0, 0, 1, 0))
        T = ids.size(1)
        rope = ((self.rope_cos[:, :T], self.rope_sin[:, :T]) if T <= self.rope_cos.size(1)
                else rope_tables(T, cfg.rope_dims, ids.device))
        x0 = x
        ve_base = self.ve_scale * self.ve_proj(self.ve_embed(ids))
        skips, v0, xm = [], None, None
        for i, block in enumerate(self.blocks):
            if i >= self.n_enc and skips:
                s = self.skip_weights[i - self.n_enc].to(x.dtype) * skips.pop()
                x, xm = x + s, None if xm is None else xm + s
            ve = ve_base * self.ve_layer_scales[self.ve_layers.index(i)] if i in self.ve_layers else None
            x, v, xm = block(x, x0, rope, v0, ve, xm)
            if i == 0:
                v0 = v
            if i < self.n_enc:
                skips.append(x)
            if self.recur_active and i == self.recur[-1]:  # the second pass: no skip pushed or taken
                for j in self.recur:
                    ve = ve_base * self.ve_layer_scales[self.ve_layers.index(j)] if j in self.ve_layers else None
                    x, _, xm = self.blocks[j](x, x0, rope, v0, ve, xm)
        return rms_norm(x if xm is None else 0.5 * (x + xm))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        c = self.cfg.logit_softcap
        return c * torch.tanh(F.linear(h, self.tok_emb.weight.to(h.dtype)).float() / c)

    def forward(self, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.logits(self.hidden(ids))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))


def nll_per_token(model: GPT, ids: torch.Tensor, targets: torch.Tensor, delta: torch.Tensor | None = None):
    h = model.hidden(ids)
    if delta is not None:
        h = h + delta.to(h.dtype)
    logits = model.logits(h)
    return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), reduction="none").view(targets.shape)

# ----------------------------------------------------------------------------------------------------
# Training (spec §2.5-2.7): warm-up, warm-down by wall clock or iterations, SWA/EMA, checkpoints
# ----------------------------------------------------------------------------------------------------


def warmup_step(cfg: Config, step: int, elapsed: float) -> float:
    """The step the warm-ups count: the real one, or under WARMUP_BY_CLOCK the clock's share of ITERATIONS."""
    if cfg.warmup_by_clock and cfg.max_wallclock_seconds > 0:
        return elapsed / cfg.max_wallclock_seconds * cfg.iterations
    return step


def recur_due(cfg: Config, step: int, elapsed: float) -> bool:
    frac = elapsed / cfg.max_wallclock_seconds if cfg.max_wallclock_seconds > 0 else step / cfg.iterations
    return frac >= cfg.recur_start


def lr_scale(cfg: Config, step: int, elapsed: float) -> float:
    warm = min(1.0, (warmup_step(cfg, step, elapsed) + 1) / cfg.warmup_steps) if cfg.warmup_steps > 0 else 1.0
    if cfg.max_wallclock_seconds > 0:  # warm-down over the last WARMDOWN_ITERS/ITERATIONS of the clock
        span = cfg.max_wallclock_seconds * cfg.warmdown_iters / cfg.iterations
        down = min(1.0, max(0.0, (cfg.max_wallclock_seconds - elapsed) / span)) if span > 0 else 1.0
    else:
        down = min(1.0, (cfg.iterations - step) / cfg.warmdown_iters) if cfg.warmdown_iters else 1.0
    return warm * down


class WeightAverage:
    """SWA (uniform mean of snapshots taken every SWA_EVERY steps once the lr scale < SWA_START_SCALE) or
    EMA; FINAL_WEIGHTS picks which one becomes the final model, and only that one is computed."""

    def __init__(self, model: GPT, cfg: Config):
        self.cfg, self.count = cfg, 0
        self.acc = None
        if cfg.final_weights == "ema":
            self.acc = [p.detach().float().clone() for p in model.parameters()]

    @torch.no_grad()
    def update(self, model: GPT, step: int, scale: float, warm_step: float) -> None:
        c = self.cfg
        if c.final_weights == "ema":
            for a, p in zip(self.acc, model.parameters()):
                a.lerp_(p.float(), 1 - c.ema_decay)
            self.count += 1
        elif (c.final_weights == "swa" and c.swa_every > 0 and warm_step >= c.warmup_steps  # a warm-down, not warm-up, low
              and scale < c.swa_start_scale and (step + 1) % c.swa_every == 0):
            if self.acc is None:
                self.acc = [torch.zeros_like(p, dtype=torch.float32) for p in model.parameters()]
            for a, p in zip(self.acc, model.parameters()):
                a.add_(p.float())
            self.count += 1

    @torch.no_grad()
    def apply(self, model: GPT) -> str:
        if self.cfg.final_weights == "live":
            return "final_weights:live"
        if self.count == 0:
            return f"final_weights:live ({self.cfg.final_weights} collected nothing)"
        div = self.count if self.cfg.final_weights == "swa" else 1
        for a, p in zip(self.acc, model.parameters()):
            p.copy_(a / div)
        what = "snapshots" if self.cfg.final_weights == "swa" else "updates"
        return f"final_weights:{self.cfg.final_weights} {what}:{self.count}"

    def state_dict(self) -> dict:
        return {"count": self.count, "acc": None if self.acc is None else [a.cpu() for a in self.acc]}

    def load_state_dict(self, sd: dict, device) -> None:
        self.count = sd["count"]
        self.acc = None if sd["acc"] is None else [a.to(device) for a in sd["acc"]]


def sync(d: Dist) -> None:
    if d.device.type == "cuda":
        torch.cuda.synchronize(d.device)


def autocast(d: Dist):
    # bf16 on GPUs (Ampere has it too); plain fp32 on CPU, where bf16 autocast is slow and noisy.
    return torch.autocast("cuda", dtype=torch.bfloat16) if d.device.type == "cuda" else torch.autocast("cpu", enabled=False)


class StepClock:
    """Training time on the wall clock, with the GPU one step ahead of the host: a full synchronization per step
    left the GPU idle while the host started the next (~2.4 ms a step on 1x H100, whose power cap paid most of it
    back: 0.2 ms of step time; an 8-GPU step is ~80 ms). After enqueuing step k the host waits only for step k-1,
    so the clock is read when k-1 has finished, and step k+1's start is estimated as that time plus one mean step
    of this segment (a segment: since the start or the last pause). `event` makes the marker that follows a step
    on the GPU (None on CPU, where every step has finished when the host moves on)."""

    def __init__(self, d: Dist, train_time: float, step: int, event=None):
        self.d, self.train_time, self.start = d, train_time, step
        self.event = event or ((lambda: torch.cuda.Event()) if d.device.type == "cuda" else lambda: None)
        self.running = None  # the newest step's marker while that step may still run
        sync(d)
        self.t0 = time.perf_counter()

    def next_start(self, step: int) -> float:
        """Training seconds at which the step about to be enqueued will start, the same on every rank."""
        now = time.perf_counter() - self.t0
        ahead = now / (step - self.start - 1) if self.running is not None else 0.0
        return self.d.agree_max(self.train_time + now + ahead)

    def enqueued(self, step: int, wait_all: bool) -> None:
        """Step `step` (counted from 1) is enqueued: wait for the one before it, or for all (wait_all, and until the
        segment has a finished step to take a mean from)."""
        newest = self.event()
        if newest is not None:
            newest.record()
        if self.running is not None:
            self.running.synchronize()
        self.running = newest
        if wait_all or step - self.start < 2:
            sync(self.d)
            self.running = None

    def now(self) -> float:
        """Training seconds so far; exact after enqueued(..., wait_all=True)."""
        return self.train_time + time.perf_counter() - self.t0

    def stop(self) -> float:
        sync(self.d)
        self.running = None
        return self.now()


def forward_backward(fwd, batches: list, d: Dist) -> torch.Tensor:
    """Accumulates the gradient of the step's mean loss over its micro-batches; returns that mean (no sync)."""
    total = torch.zeros((), device=d.device)
    for x, y in batches:
        with autocast(d):
            loss = fwd(x, y)
        (loss / len(batches)).backward()
        total += loss.detach()
    return total / len(batches)


def save_checkpoint(cfg: Config, d: Dist, model, opt, loader, avg, step: int, train_time: float, log: Log) -> None:
    state = {"model": {k: v.cpu() for k, v in model.state_dict().items()}, "optim": opt.state_dict(),
             "loader": loader.stream.state(), "avg": avg.state_dict(), "step": step, "train_time": train_time,
             "world": d.world, "config": dataclasses.asdict(cfg)}
    if d.main:
        path = Path(cfg.run_dir) / f"ckpt_step{step:06d}.pt"
        atomic_torch_save(state, path)
        for old in sorted(p for p in Path(cfg.run_dir).glob("ckpt_step*.pt") if p.name <= path.name)[:-2]:  # keep two
            old.unlink()
        log(f"checkpoint:{path} step:{step}")


def load_checkpoint(path: str, device, cfg: Config) -> dict:
    if not os.path.isfile(path):
        raise InputError(f"--resume {path}: no such file")
    try:
        ck = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise InputError(f"--resume {path}: not a readable checkpoint ({type(e).__name__}: {e})") from None
    was = {k: ck.get("config", {}).get(k, MODEL_FIELDS_ADDED.get(k)) for k in MODEL_FIELDS}  # the model it holds
    diff = [f"{k.upper()} (checkpoint {was[k]}, now {getattr(cfg, k)})" for k in MODEL_FIELDS if was[k] != getattr(cfg, k)]
    if diff:
        raise InputError(f"--resume {path}: the checkpoint differs in {', '.join(diff)}")
    ck["path"] = path
    return ck


def mean_loss(loss: torch.Tensor, d: Dist, step: int) -> float:
    """The ranks' mean training loss; all see the same one, so a non-finite one stops every rank alike. Read only
    where the loop synchronizes anyway (logged steps, pauses, the end): checking every step would cost a GPU sync."""
    v = d.all_reduce(loss.detach().clone()).item() / d.world
    if not math.isfinite(v):
        raise InputError(f"training diverged at step {step} (loss {v}); lower the learning rates or resume an earlier checkpoint")
    return v


def train(cfg: Config, d: Dist, log: Log, ck: dict | None = None) -> tuple[GPT, dict]:
    """Trains from scratch, or on from `ck` (load_checkpoint's, checked against cfg before any work)."""
    torch.manual_seed(cfg.seed)
    model = GPT(cfg).to(d.device)
    model.set_quantized(bool(cfg.qat))
    for p in model.parameters():  # one initialization for all ranks, whatever their RNG did
        if d.world > 1:
            dist.broadcast(p.data, 0)
    log(f"model_params:{sum(p.numel() for p in model.parameters())} world_size:{d.world} device:{d.device} "
        f"attention:{'fa3' if fast.fa3_attn is not None and d.device.type == 'cuda' else 'sdpa'}")
    log("config " + json.dumps(dataclasses.asdict(cfg), sort_keys=True))
    if cfg.gptq and cfg.max_wallclock_seconds > 0:  # GPTQ's calibration and solve run on the clock: schedule without it
        cfg = dataclasses.replace(cfg, max_wallclock_seconds=cfg.max_wallclock_seconds - cfg.gptq_reserve_s)
    fwd = torch.compile(model, dynamic=False, fullgraph=True) if cfg.compile else model
    if cfg.compile and cfg.compile_warmup_steps > 0:  # compile before the clock, then restore (rules §1.2)
        t0 = time.perf_counter()
        snapshot = {k: v.clone() for k, v in model.state_dict().items()}
        opt, loader = Optimizers(model, cfg, d), TrainLoader(cfg, d)
        for s in range(cfg.compile_warmup_steps):
            model.recur_active = bool(model.recur) and s % 2 == 1  # both graphs compile before the clock
            forward_backward(fwd, loader.next_step(), d)
            opt.step(s, lr_scale(cfg, s, 0.0))
            opt.zero_grad()
        model.load_state_dict(snapshot)
        sync(d)
        log(f"compile_warmup:{time.perf_counter() - t0:.1f}s steps:{cfg.compile_warmup_steps} (untimed)")

    opt, loader, avg = Optimizers(model, cfg, d), TrainLoader(cfg, d), WeightAverage(model, cfg)
    step, train_time = 0, 0.0
    if ck:
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optim"])
        loader.load_state(ck["loader"])
        avg.load_state_dict(ck["avg"], d.device)
        step, train_time = int(ck["step"]), float(ck["train_time"])
        log(f"resumed:{ck['path']} step:{step} train_time:{train_time * 1000:.0f}ms")
    log(f"train_batch_tokens:{cfg.train_batch_tokens} seq_len:{cfg.train_seq_len} micro_batch_seqs:{loader.m} "
        f"grad_accum:{loader.accum} iterations:{cfg.iterations} max_wallclock_seconds:{cfg.max_wallclock_seconds}")
    val = None
    if cfg.val_every > 0:
        val = ValData(cfg)
    first_step = step
    clock = StepClock(d, train_time, step)
    model.recur_active = False
    while True:
        elapsed = clock.next_start(step)  # every rank uses the same clock: same lr, same stop step
        if step >= cfg.iterations or 0 < cfg.max_wallclock_seconds <= elapsed:
            break
        if model.recur and not model.recur_active and recur_due(cfg, step, elapsed):
            model.recur_active = True
            log(f"recur: layers {cfg.recur_layers} run twice from step {step} ({elapsed:.1f}s)")
        scale, warm_step = lr_scale(cfg, step, elapsed), warmup_step(cfg, step, elapsed)
        loss = forward_backward(fwd, loader.next_step(), d)
        opt.step(warm_step, scale)
        opt.zero_grad()
        avg.update(model, step, scale, warm_step)
        step += 1
        logged = step <= 10 or step % cfg.log_every == 0 or step == cfg.iterations
        clock.enqueued(step, wait_all=logged)
        if logged:
            now = clock.now()
            loss_mean = mean_loss(loss, d, step)
            avg_ms = 1000 * now / step
            log(f"step:{step}/{cfg.iterations} train_loss:{loss_mean:.4f} train_time:{now * 1000:.0f}ms step_avg:{avg_ms:.2f}ms "
                f"tok/s:{cfg.train_batch_tokens / avg_ms * 1000:.0f} lr_scale:{scale:.4f}")
        pause = (cfg.val_every > 0 and step % cfg.val_every == 0) or (cfg.save_every > 0 and step % cfg.save_every == 0)
        if pause and step < cfg.iterations:  # periodic val and checkpoints stay off the clock
            train_time = clock.stop()
            mean_loss(loss, d, step)  # no checkpoint of a diverged run
            if cfg.val_every > 0 and step % cfg.val_every == 0:
                r = evaluate(model, val, cfg, d, stride=cfg.eval_seq_len)
                log(f"step:{step}/{cfg.iterations} val_loss:{r['val_loss']:.4f} val_bpb:{r['val_bpb']:.4f}")
            if cfg.save_every > 0 and step % cfg.save_every == 0:
                save_checkpoint(cfg, d, model, opt, loader, avg, step, train_time, log)
            clock = StepClock(d, train_time, step)
    train_time = clock.stop()
    if step > first_step:
        mean_loss(loss, d, step)
    ran = max(step - first_step, 1)
    log(f"stopped step:{step}/{cfg.iterations} train_time:{train_time * 1000:.0f}ms step_avg:{1000 * train_time / max(step, 1):.2f}ms "
        f"tok/s:{ran * cfg.train_batch_tokens / max(train_time, 1e-9):.0f}")
    if cfg.save_every > 0 and step % cfg.save_every == 0:
        save_checkpoint(cfg, d, model, opt, loader, avg, step, train_time, log)
    if d.device.type == "cuda":
        log(f"peak_mem_allocated:{torch.cuda.max_memory_allocated(d.device) / 2**20:.0f}MiB "
            f"peak_mem_reserved:{torch.cuda.max_memory_reserved(d.device) / 2**20:.0f}MiB")
    log(avg.apply(model))
    check_ranks_agree(model, d, step, log)
    if d.main:
        atomic_torch_save({"model": {k: v.cpu() for k, v in model.state_dict().items()},
                           "config": dataclasses.asdict(cfg)}, Path(cfg.run_dir) / "model.pt")
    log(f"saved:{Path(cfg.run_dir) / 'model.pt'}")
    levels, gptq_s = gptq_export(model, cfg, d, loader, log) if cfg.gptq else (None, 0.0)
    return model, {"steps": step, "train_time": train_time + gptq_s, "gptq": levels}


def check_ranks_agree(model: GPT, d: Dist, step: int, log: Log) -> None:
    """A replica that drifted (or a rank that stopped elsewhere) must fail loudly, not ship rank 0's copy."""
    flat = torch.cat([p.detach().double().reshape(-1) for p in model.parameters()])
    mine = torch.stack([flat.sum(), (flat * torch.arange(1, flat.numel() + 1, device=flat.device, dtype=torch.float64).remainder(97)).sum(),
                        torch.tensor(float(step), device=flat.device, dtype=torch.float64)])
    got = [torch.zeros_like(mine) for _ in range(d.world)]
    if d.world > 1:
        dist.all_gather(got, mine)
    else:
        got = [mine]
    if any(not torch.equal(g, got[0]) for g in got):
        raise RuntimeError(f"ranks disagree on final weights or step: {[g.tolist() for g in got]}")
    log(f"ranks_agree:{d.world} step:{step} weights_checksum:{mine[0].item():.10e}")

# ----------------------------------------------------------------------------------------------------
# Quantization and artifact (spec §3-4): per-row quantized matrices through our rANS codec, fp16 for the
# rest, in a pickle-free container (JSON header + raw blobs + SHA-256), then lzma-9e or zstd-22.
# ----------------------------------------------------------------------------------------------------

SIZE_CAP = 16_000_000
CODE_FILES = ("train_gpt.py", "hq_dist.py", "fused_kernels.py", "cutlass_mlp.cu", "hq_optim.py", "rans_codec.py",
              "hq_artifact.py", "hq_adapt.py", "hq_data.py", "hq_gptq.py",
              "hq_doc_ttt.py")  # the code a run uses, packed
GROUP_ROLES = {"c_q": "q/k", "c_k": "q/k", "c_v": "v/o", "proj": "v/o", "up": "mlp-up", "down": "mlp-down",
               "tok_emb": "tok_emb", "bigram_embed": "bigram", "ve_embed": "value-emb"}  # a matrix's size-table group


def group_name(tensor: str, alphabet: int) -> str:
    return f"{ALPHABET_NAMES[alphabet]} {GROUP_ROLES[tensor.split('.')[-2]]}"


def quantized_tensors(model: GPT, cfg: Config) -> dict[str, int]:
    """Name -> alphabet of every tensor stored as quantized symbols."""
    out = {f"{n}.weight": m.alphabet for n, m in model.named_modules() if isinstance(m, QATLinear)}
    if cfg.embed_bits != 16:
        out["tok_emb.weight"] = 2 ** cfg.embed_bits  # post-training, per vocab row (spec V62)
    if cfg.table_bits != 16:
        out.update({"bigram_embed.weight": 2 ** cfg.table_bits, "ve_embed.weight": 2 ** cfg.table_bits})
    return out


def gptq_export(model: GPT, cfg: Config, d: Dist, loader: TrainLoader, log: Log) -> tuple[dict, float]:
    """Every QATLinear's levels by GPTQ (hq_gptq) at quantize_rows' scales (as build_artifact computes them, on the
    CPU), from GPTQ_CALIB_SEQS sequences of the training stream (never val) split over the ranks; and its seconds."""
    mods, seqs = dict(model.named_modules()), -(-cfg.gptq_calib_seqs // d.world) * d.world  # equal shares per rank
    # q, k and v multiply their attention's input in one matmul; the fused kernels call no linear's forward
    lins = [(f"{n}.weight", n.rsplit(".", 1)[0] if n.endswith(("c_q", "c_k", "c_v")) else n, m.weight, m.alphabet)
            for n, m in mods.items() if isinstance(m, QATLinear)]
    with hq_gptq.attr_set([m for m in mods.values() if getattr(m, "fused", False)], "fused", False):
        levels, t = hq_gptq.export(model, [(n, k, mods[k], w, a) for n, k, w, a in lins],
                                   lambda: [x for x, _ in loader.next_step()], seqs // d.world, GPT.hidden,
                                   lambda w, a: quantize_rows(w.float().cpu(), a)[1], d.all_reduce, lambda: sync(d),
                                   lambda: autocast(d))
    log(f"gptq: calib_seqs:{seqs} tokens:{seqs * cfg.train_seq_len} hessian:{t['hessian']:.1f}s solve:{t['solve']:.1f}s "
        f"total:{t['total']:.1f}s reserve:{cfg.gptq_reserve_s:.1f}s")
    if cfg.max_wallclock_seconds > 0 and t["total"] > cfg.gptq_reserve_s:
        log(f"gptq: WARNING: {t['total']:.1f}s, over GPTQ_RESERVE_S={cfg.gptq_reserve_s:.1f}s: the run overran the clock")
    return levels, t["total"]


def build_artifact(model: GPT, cfg: Config, levels: dict | None = None) -> tuple[bytes, list]:
    """Returns the uncompressed payload and a per-group size table (the container: hq_artifact.pack)."""
    def quantize(w: np.ndarray, a: int) -> tuple[np.ndarray, np.ndarray]:
        q, scale = quantize_rows(torch.from_numpy(w), a)
        q = (levels or {}).get(names[id(w)], q)  # `levels` (GPTQ's), made for these scales, replace rounding's
        return (q + a // 2).to(torch.uint8).numpy(), scale.numpy()
    qnames = quantized_tensors(model, cfg)
    tensors = [(k, v.detach().float().cpu().numpy(), qnames.get(k)) for k, v in model.state_dict().items()]
    names = {id(w): k for k, w, _ in tensors}  # pack hands quantize the arrays of `tensors` themselves
    mc = {k: getattr(cfg, k) for k in MODEL_FIELDS + EVAL_FIELDS}
    if not model.recur_active:  # a run that stopped before RECUR_START was trained, and is scored, without it
        mc["recur_layers"] = ""
    return hq_artifact.pack(tensors, mc, quantize, group_name)


def artifact_config(mc: dict) -> Config:
    """The model's fields and (when recorded: artifacts before 2026-12-06 lack them) the eval settings."""
    cfg = Config()
    for k in MODEL_FIELDS + EVAL_FIELDS:
        if k in mc or k not in EVAL_FIELDS:
            v = mc.get(k, MODEL_FIELDS_ADDED[k]) if k in MODEL_FIELDS_ADDED else mc[k]
            setattr(cfg, k, type(getattr(cfg, k))(v))
    check_config(cfg)
    return cfg


def check_artifact_model(cfg: Config, table: list, dim_cap: int, total: int) -> None:
    """After hq_artifact.check_table, the table against the model its config describes (on the meta device, its
    size first bounded by the table): names in its state-dict order, its shapes, and its quantized matrices
    with its alphabets (the tables quantized after training, EMBED_BITS and TABLE_BITS, may differ)."""
    # every layer has tensors, model_dim sizes fp16 gains and quantized rows (inside the blob) and a
    # dim x dim matrix: so building the model (meta device, but rope tables on the CPU) stays cheap
    if cfg.num_layers > len(table) or cfg.model_dim > dim_cap or cfg.model_dim ** 2 > total:
        raise ValueError(f"config ({cfg.num_layers} layers, dim {cfg.model_dim}) larger than the table holds")
    try:
        with torch.device("meta"):
            model = GPT(cfg)
        want = {k: list(v.shape) for k, v in model.state_dict().items()}
        qat = quantized_tensors(model, cfg)
    except (RuntimeError, OverflowError, ValueError, MemoryError) as e:
        raise ValueError(f"the config describes no buildable model ({type(e).__name__}: {e})") from None
    if [t[0] for t in table] != list(want):
        raise ValueError("tensor names or their order differ from the model its config describes")
    for name, shape, a, _ in table:
        if shape != want[name]:
            raise ValueError(f"{name}: shape {shape}, the model's is {want[name]}")
        if name in qat and a != qat[name]:
            raise ValueError(f"{name}: alphabet {a}, the config's is {qat[name]}")


def parse_artifact(data: bytes, path: str, evals: dict | None = None) -> tuple[Config, dict[str, torch.Tensor]]:
    """Checks and decodes an artifact without executing anything from it (hq_artifact.parse: the whole header
    is validated before anything is decoded, and the rANS decode is bounded by what it declares). `evals`, if
    given, receives the eval settings the artifact records."""
    def make_config(mc: dict) -> Config:
        cfg = artifact_config(mc)
        if evals is not None:
            evals.update({k: getattr(cfg, k) for k in EVAL_FIELDS if k in mc})
        return cfg
    try:
        cfg, arrays = hq_artifact.parse(data, make_config, check_artifact_model, wrap=(InputError,))
    except hq_artifact.ArtifactError as e:
        raise InputError(f"{path}: {e}") from None
    return cfg, {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else
                 dequantize_rows(torch.from_numpy(v[1]), torch.from_numpy(v[2]), v[0]) for k, v in arrays.items()}


def load_artifact(path: str, device, evals: dict | None = None) -> tuple[GPT, Config]:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise InputError(f"{path}: cannot read artifact ({e.strerror})") from None
    mcfg, sd = parse_artifact(data, path, evals)  # names, order and shapes checked against GPT(mcfg) on the meta device
    model = GPT(mcfg)
    model.load_state_dict(sd, strict=True)
    model.set_quantized(False)  # the weights already are the dequantized values
    return model.to(device), mcfg


def code_sizes() -> dict:
    """The counted code is the self-extracting train_gpt.py that --pack writes (packing.py): when running packed,
    that file (its stub sets __packed_file__); from the sources, CODE_FILES packed in memory (the same bytes)."""
    here = Path(__file__).resolve().parent
    packed_file = globals().get("__packed_file__")
    if packed_file:
        script = Path(packed_file).read_bytes()
    else:
        import packing
        script = packing.pack_script(here, CODE_FILES)
    return {"packed": len(script), "source": sum((here / f).stat().st_size for f in CODE_FILES),
            "sha256": hashlib.sha256(script).hexdigest()}


def code_bytes() -> int:
    return code_sizes()["packed"]


def write_artifact(model: GPT, cfg: Config, d: Dist, log: Log, levels: dict | None = None) -> tuple[str, dict]:
    """Rank 0 builds and writes the artifact atomically; fails loudly (and writes nothing) over the cap."""
    info = {}
    if d.main:
        t0 = time.perf_counter()
        payload, table = build_artifact(model, cfg, levels)
        t1 = time.perf_counter()
        blob = hq_artifact.compress(payload, cfg.compressor)
        t2 = time.perf_counter()
        sizes = code_sizes()
        code = sizes["packed"]
        info = {"bytes_model": len(blob), "bytes_code": code, "bytes_total": len(blob) + code,
                "bytes_code_source": sizes["source"], "code_sha256": sizes["sha256"],
                "payload_bytes": len(payload), "encode_s": t1 - t0, "compress_s": t2 - t1}
        log(f"artifact_groups: {'group':<18}{'params':>11}{'bits/weight':>13}{'bytes':>12}{'share':>8}")
        for g, n, bpw, b in table:
            log(f"artifact_groups: {g:<18}{n:>11}{bpw:>13.3f}{b:>12.0f}{100 * b / len(payload):>7.2f}%")
        log(f"artifact: payload:{len(payload)} compressed:{len(blob)} ({cfg.compressor}) encode:{t1 - t0:.2f}s compress:{t2 - t1:.2f}s")
        log(f"size: code:packed:{code} source:{sizes['source']} + model:{len(blob)} = total:{len(blob) + code} cap:{SIZE_CAP} "
            f"{'UNDER' if len(blob) + code <= SIZE_CAP else 'OVER'}")
    over = d.all_reduce(torch.tensor([float(info.get("bytes_total", 0) > SIZE_CAP)], device=d.device)).item() > 0
    if over:
        raise SystemExit(f"FAILED: artifact + code exceed {SIZE_CAP} bytes; no artifact written")
    path = str(Path(cfg.run_dir) / "model.hqa")
    if d.main:
        atomic_write(path, blob)
        log(f"saved:{path}")
    if d.world > 1:
        dist.barrier()
    return path, info


# ----------------------------------------------------------------------------------------------------
# Evaluation (spec §5, rules §2.5): exact val_bpb, sliding windows, score-first TTT, SLOT
# Legality (rules §1.4): sliding, TTT and causal SLOT meet C1-C4; reference SLOT fails C1/C3.
# ----------------------------------------------------------------------------------------------------

LEGAL = {"raw": True, "roundtrip": True, "sliding": True, "ttt": True, "slot_causal": True, "slot_reference": False}


def byte_luts(path: str, vocab_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rules §2.5: bytes of each piece (leading '▁' stripped), whether it had one, and boundary ids."""
    import sentencepiece as spm
    if not os.path.isfile(path):
        raise InputError(f"tokenizer {path}: no such file")
    sp = spm.SentencePieceProcessor(model_file=path)
    n = max(sp.vocab_size(), vocab_size)
    base, space, boundary = np.zeros(n, np.int64), np.zeros(n, bool), np.ones(n, bool)
    for i in range(sp.vocab_size()):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            continue
        boundary[i] = False
        if sp.is_byte(i):
            base[i] = 1
            continue
        piece = sp.id_to_piece(i)
        space[i] = piece.startswith("\u2581")
        base[i] = len(piece.removeprefix("\u2581").encode("utf-8"))
    return base, space, boundary


class ValData:
    """The val stream and the byte count of every target (target j is token j+1, predicted from <= j)."""

    def __init__(self, cfg: Config, tokens: np.ndarray | None = None):
        self.tokens = load_val_tokens(cfg) if tokens is None else tokens
        if len(self.tokens) < 2:
            raise InputError("val stream needs at least 2 tokens")
        base, space, boundary = byte_luts(cfg.tokenizer_path, cfg.vocab_size)
        x, y = self.tokens[:-1].astype(np.int64), self.tokens[1:].astype(np.int64)
        self.bytes = base[y] + (space[y] & ~boundary[x])
        self.n, self.mean_bytes = len(y), float(self.bytes.mean())


def window_ends(n_targets: int, seq_len: int, stride: int) -> np.ndarray:
    """Window k scores targets [ends[k-1], ends[k]) with inputs [ends[k]-L, ends[k]), L = ends[0]: every
    target exactly once, each with at least L - stride of context (all it has, near the start)."""
    return np.append(np.arange(min(seq_len, n_targets), n_targets, stride, dtype=np.int64), n_targets)


def window_batch(val: ValData, ends: np.ndarray, ks: np.ndarray, d: Dist):
    L = int(ends[0])
    e = ends[ks]
    idx = (e - L)[:, None] + np.arange(L)
    x = torch.from_numpy(val.tokens[idx].astype(np.int64)).to(d.device)
    y = torch.from_numpy(val.tokens[idx + 1].astype(np.int64)).to(d.device)
    prev = np.where(ks > 0, ends[np.maximum(ks - 1, 0)], 0)
    first = torch.from_numpy(L - (e - prev)).to(d.device)  # position of the first scored target
    return x, y, first[:, None] <= torch.arange(L, device=d.device)[None, :]


class Scorer:
    """Scores windows of the val stream; returns float64 NLL per scored target, in stream order."""

    def __init__(self, model: GPT, val: ValData, cfg: Config, d: Dist, seq_len: int, stride: int, slot: str = "off",
                 deadline: float = math.inf, log: Log | None = None):
        self.model, self.val, self.cfg, self.d, self.slot = model, val, cfg, d, slot
        self.deadline, self.log = deadline, log
        self.ends = window_ends(val.n, seq_len, stride)
        use_compile = bool(cfg.compile) and d.device.type == "cuda"
        self.nll = torch.compile(nll_per_token, dynamic=False) if use_compile else nll_per_token
        self.hidden = torch.compile(model.hidden, dynamic=False) if use_compile else model.hidden
        self.slot_step = torch.compile(slot_adam_step, dynamic=False) if use_compile else slot_adam_step
        self.slot_active = slot != "off"

    def target_range(self, k_lo: int, k_hi: int) -> tuple[int, int]:
        return (int(self.ends[k_lo - 1]) if k_lo > 0 else 0), int(self.ends[k_hi - 1])

    def score(self, k_lo: int, k_hi: int, progress=None) -> np.ndarray:
        out, bs, t0 = [], self.cfg.eval_batch_seqs, time.perf_counter()
        for b in range(k_lo, k_hi, bs):
            if self.slot_active and b > k_lo:  # stop adapting (never scoring) when the rest would overrun
                per_batch = (time.perf_counter() - t0) / ((b - k_lo) / bs)
                if time.perf_counter() + per_batch * (k_hi - b) / bs > self.deadline:
                    self.slot_active = False
                    if self.log:
                        self.log(f"eval: budget: SLOT stops adapting at window {b}/{k_hi} (rank {self.d.rank}); "
                                 f"the remaining windows are scored without it")
            ks = np.arange(b, min(b + bs, k_hi))
            real = len(ks)
            if real < bs:  # one batch shape throughout (no recompiling): repeat the last window, drop the copies
                ks = np.concatenate((ks, np.full(bs - real, ks[-1])))
            x, y, scored = window_batch(self.val, self.ends, ks, self.d)
            scored[real:] = False
            nll = self._score_batch(x, y, scored)
            out.append(nll[:real][scored[:real]].double().cpu().numpy())
            if progress:
                progress(b + real - k_lo, out)
        return np.concatenate(out) if out else np.zeros(0)

    def _score_batch(self, x, y, scored) -> torch.Tensor:
        if not self.slot_active:
            with torch.inference_mode(), autocast(self.d):
                return self.nll(self.model, x, y)
        with torch.no_grad(), autocast(self.d):
            h = self.hidden(x).float()
        if self.slot == "reference":
            delta = fit_slot_delta(self.slot_step, self.model, h, y, scored, self.cfg, shared=True)
        else:  # causal: context = positions before each window's scored slice; the first window has none
            delta = fit_slot_delta(self.slot_step, self.model, h, y, ~scored, self.cfg, shared=False)
        with torch.inference_mode(), autocast(self.d):
            logits = self.model.logits(h + delta)
            return F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1), reduction="none").view(y.shape)


class Progress:
    """Progress lines at every ~10%: tokens/s, running bpb (rank 0's share), ETA."""

    def __init__(self, name: str, total: int, val: ValData, t_lo: int, log: Log):
        self.name, self.total, self.val, self.t_lo, self.log = name, max(total, 1), val, t_lo, log
        self.t0, self.next = time.perf_counter(), 0.1

    def __call__(self, done: int, parts: list) -> None:
        if self.due(done):
            n = sum(len(p) for p in parts)
            # rank 0 scores a contiguous block (sliding, SLOT) or the first slice of each chunk (TTT); the bytes
            # per target average ~2.4 either way, so TTT's running bpb uses the stream's mean bytes per target
            nbytes = float(self.val.bytes[self.t_lo:self.t_lo + n].sum()) if self.t_lo is not None else n * self.val.mean_bytes
            self.line(done, n, sum(float(p.sum()) for p in parts), nbytes)

    def due(self, done: int) -> bool:
        return done / self.total + 1e-9 >= self.next or done >= self.total

    def line(self, done: int, n: int, nll: float, nbytes: float) -> None:
        self.next = math.floor(done / self.total * 10 + 1) / 10
        dt = time.perf_counter() - self.t0
        self.log(f"eval:{self.name} {100 * done / self.total:.0f}% tokens/s:{n / max(dt, 1e-9):.0f} "
                 f"running_bpb:{nll / math.log(2) / max(nbytes, 1):.6f} eta:{dt * (self.total - done) / max(done, 1):.0f}s")


def score_sums(segments: list, val: ValData, d: Dist) -> torch.Tensor:
    """[sum NLL, sum bytes, targets] over every rank's segments, in float64."""
    sums = torch.tensor([sum(float(n.sum()) for _, n in segments), sum(float(val.bytes[t:t + len(n)].sum()) for t, n in segments),
                         sum(len(n) for _, n in segments)], dtype=torch.float64)
    return d.all_reduce(sums.to(d.device)).cpu()


def reduce_score(segments: list, val: ValData, d: Dist, name: str, t0: float, log: Log,
                 save_nll: str | None = None) -> dict:
    """Exact metric (rules §2.5) from every rank's scored segments [(first target, NLLs), ...]: float64 sums
    over ranks, and a check that the segments of all ranks tile the val stream exactly once (C4)."""
    spans = [(t, len(n)) for t, n in segments]
    sums = score_sums(segments, val, d)
    if d.world > 1:
        gathered = [None] * d.world
        dist.all_gather_object(gathered, spans)
        spans = [sp for g in gathered for sp in g]
    pos = 0
    for t, k in sorted(spans):
        if t != pos:
            raise RuntimeError(f"{name}: targets {min(t, pos)}..{max(t, pos)} scored {'twice' if t < pos else 'never'}")
        pos += k
    if pos != val.n or int(sums[2]) != val.n:
        raise RuntimeError(f"{name}: scored {int(sums[2])} targets, val stream has {val.n}")
    if save_nll:
        parts = segments
        if d.world > 1:
            gathered = [None] * d.world
            dist.all_gather_object(gathered, segments)
            parts = [p for g in gathered for p in g]
        if d.main:
            buf = io.BytesIO()
            np.save(buf, np.concatenate([n for _, n in sorted(parts, key=lambda p: p[0])]))
            atomic_write(save_nll, buf.getvalue())
    r = {"val_loss": float(sums[0] / sums[2]), "val_bpb": float(sums[0] / (math.log(2) * sums[1])),
         "targets": int(sums[2]), "seconds": time.perf_counter() - t0, "legal": LEGAL[name]}
    log(f"final_{name} val_loss:{r['val_loss']:.8f} val_bpb:{r['val_bpb']:.8f} eval_time:{r['seconds'] * 1000:.0f}ms"
        + ("" if r["legal"] else " NOT RECORD-LEGAL (fails C3)"))
    return r


def evaluate(model: GPT, val: ValData, cfg: Config, d: Dist, stride: int, name: str = "", slot: str = "off",
             log: Log | None = None, save_nll: str | None = None, deadline: float = math.inf) -> dict:
    """One pass over the val stream, windows split across ranks in contiguous blocks."""
    t0, log = time.perf_counter(), log or (lambda msg: None)
    sc = Scorer(model, val, cfg, d, cfg.eval_seq_len, stride, slot, deadline, log)
    nw = len(sc.ends)
    k_lo, k_hi = nw * d.rank // d.world, nw * (d.rank + 1) // d.world
    t_lo, _ = sc.target_range(k_lo, k_hi) if k_hi > k_lo else (0, 0)
    was_training = model.training
    model.eval()
    prog = Progress(name, k_hi - k_lo, val, t_lo, log) if name else None
    nll = sc.score(k_lo, k_hi, prog) if k_hi > k_lo else np.zeros(0)
    model.train(was_training)
    if not name:  # periodic val during training: just the numbers
        sums = score_sums([(t_lo, nll)], val, d)
        return {"val_loss": float(sums[0] / sums[2]), "val_bpb": float(sums[0] / (math.log(2) * sums[1]))}
    return reduce_score([(t_lo, nll)], val, d, name, t0, log, save_nll)


def eval_ttt(model: GPT, val: ValData, cfg: Config, d: Dist, log: Log, deadline: float,
             save_nll: str | None = None) -> dict:
    """Legal score-first TTT (spec §5.4, fixed): the val stream in chunks of TTT_CHUNK_TOKENS targets; each
    chunk is scored under inference_mode, then trained on -- only its own, already scored targets -- and
    only then is the next chunk scored. Scoring is split across ranks; gradients are averaged."""
    if cfg.ttt_lora_rank > 0:  # per-document LoRA TTT instead; it leaves the model itself unchanged
        return hq_doc_ttt.eval_doc_lora_ttt(model, val, cfg, d, log, deadline, save_nll, **hq_doc_ttt.cfg_kwargs(cfg))
    t0 = time.perf_counter()
    model = copy.deepcopy(model)  # adapt a private copy: later phases must never see val-trained weights
    sc = Scorer(model, val, cfg, d, cfg.eval_seq_len, cfg.eval_stride)
    L, ends = int(sc.ends[0]), sc.ends
    starts = np.concatenate(([0], ends[:-1]))
    chunk_of = starts // cfg.ttt_chunk_tokens  # a window belongs to the chunk holding its first scored target
    bounds = np.flatnonzero(np.diff(chunk_of)) + 1
    chunks = np.split(np.arange(len(ends)), bounds)
    model.zero_grad(set_to_none=True)  # adapt from the chunks' gradients alone
    frozen = {id(p) for b in model.blocks[:cfg.ttt_freeze_blocks] for p in b.parameters()}
    params = [p for p in model.parameters() if id(p) not in frozen]
    for p in model.parameters():
        p.requires_grad_(id(p) not in frozen)
    sgd = torch.optim.SGD(params, lr=cfg.ttt_lr, momentum=cfg.ttt_momentum) if cfg.ttt_optimizer == "sgd" else None
    log(f"ttt: chunks:{len(chunks)} chunk_tokens:{cfg.ttt_chunk_tokens} optimizer:{cfg.ttt_optimizer} lr:{cfg.ttt_lr} "
        f"epochs:{cfg.ttt_epochs} trainable_params:{sum(p.numel() for p in params)} frozen_blocks:{cfg.ttt_freeze_blocks}")
    parts, t_score, t_train, adapting = [], 0.0, 0.0, True
    prog = Progress("ttt", len(chunks), val, None, log)
    for c, ks in enumerate(chunks):
        ts = time.perf_counter()
        lo, hi = ks[0] + len(ks) * d.rank // d.world, ks[0] + len(ks) * (d.rank + 1) // d.world
        model.eval()
        if hi > lo:
            parts.append((sc.target_range(lo, hi)[0], sc.score(lo, hi)))
        t_score += time.perf_counter() - ts
        prog(c + 1, [n for _, n in parts])
        if c == len(chunks) - 1 or not adapting:
            continue
        # Adapt only if the rest still fits the budget: remaining scoring + this chunk's training.
        left = deadline - time.perf_counter()
        need = (len(chunks) - c - 1) * t_score / (c + 1) + (t_train / c if c else 0.0)
        if d.all_reduce(torch.tensor([float(need > left)], device=d.device), dist.ReduceOp.MAX).item() > 0:
            adapting = False
            log(f"ttt: eval budget reached at chunk {c + 1}/{len(chunks)}: scoring continues without adaptation")
            continue
        ts = time.perf_counter()
        a, b = sc.target_range(int(ks[0]), int(ks[-1]) + 1)
        seq_ends = [e for e in range(b, a, -L) if e - L >= 0]  # sequences cover the chunk's targets only
        mine = seq_ends[d.rank::d.world]
        lr = cfg.ttt_lr * 0.5 * (1 + math.cos(math.pi * c / max(len(chunks) - 1, 1)))
        model.train()
        for _ in range(cfg.ttt_epochs):
            if mine:
                idx = np.array(mine)[:, None] - L + np.arange(L)
                x = torch.from_numpy(val.tokens[idx].astype(np.int64)).to(d.device)
                y = torch.from_numpy(val.tokens[idx + 1].astype(np.int64)).to(d.device)
                with autocast(d):
                    loss = nll_per_token(model, x, y).sum() / (len(seq_ends) * L)
                loss.backward()
            ttt_update(params, sgd, lr, cfg, d)
        t_train += time.perf_counter() - ts
    log(f"ttt: score_time:{t_score:.1f}s train_time:{t_train:.1f}s")
    return reduce_score(parts, val, d, "ttt", t0, log, save_nll)

# ----------------------------------------------------------------------------------------------------
# Main: train -> checkpoint -> raw val_bpb -> artifact -> evaluation of the artifact -> submission.json
# ----------------------------------------------------------------------------------------------------


def eval_plan(cfg: Config, n: int, roundtrip_s: float) -> dict:
    """Each later phase's seconds, from the round trip's (one forward of every target): sliding forwards every
    window's full context; TTT adds about three forwards' worth (forward + backward) per epoch over the
    stream; SLOT's inner steps roughly double sliding's time (docs/performance.md)."""
    sliding = len(window_ends(n, cfg.eval_seq_len, cfg.eval_stride)) * min(cfg.eval_seq_len, n) / n * roundtrip_s
    return {"sliding": sliding, "ttt": sliding + 3 * cfg.ttt_epochs * roundtrip_s, f"slot_{cfg.slot}": 2 * sliding}


def final_eval(model: GPT, cfg: Config, d: Dist, log: Log, save_nll: str | None) -> dict:
    """Every enabled mode, each a full pass scoring every target once, under the eval budget clock. The
    score is TTT's if on, else causal SLOT's if on, else sliding's: fixed by the config, not by the results.
    The score's mode runs right after the round trip; another mode runs only if its estimate fits what is left."""
    t0 = time.perf_counter()
    val = ValData(cfg)
    log(f"eval_phase:load_val {time.perf_counter() - t0:.1f}s targets:{val.n}")
    if cfg.compile and d.device.type == "cuda":  # compile warm-up, logged apart from the budget (rules §1.3)
        t = time.perf_counter()
        small = ValData(cfg, val.tokens[:cfg.eval_seq_len * 4 + 1])
        for slot in ("off", cfg.slot) if cfg.slot != "off" else ("off",):
            evaluate(model, small, cfg, d, stride=cfg.eval_stride, slot=slot)
        log(f"eval_phase:compile_warmup {time.perf_counter() - t:.1f}s (untimed)")
    start = time.perf_counter()
    deadline = start + cfg.eval_budget_s
    slot_name = f"slot_{cfg.slot}"
    owner = "ttt" if cfg.ttt else slot_name if cfg.slot == "causal" else "sliding"  # who writes --save-nll
    results = {"roundtrip": evaluate(model, val, cfg, d, cfg.eval_seq_len, "roundtrip", log=log)}
    rt = d.agree_max(results["roundtrip"]["seconds"])
    est = eval_plan(cfg, val.n, rt)
    enabled = {"sliding": True, "ttt": bool(cfg.ttt), slot_name: cfg.slot != "off"}
    order = [owner] + [m for m, on in enabled.items() if on and m != owner]
    log(f"eval_plan: budget:{cfg.eval_budget_s:.0f}s roundtrip:{rt:.1f}s then " +
        " ".join(f"{m}:~{est[m]:.1f}s" for m in order) + f" (the score: {owner}, always run)")
    skipped = []
    for m in order:
        left = deadline - time.perf_counter()
        # ranks' clocks differ slightly: any rank short of time skips the phase for all
        if m != owner and d.agree_max(float(est[m] > left)) > 0:
            skipped.append(f"{m}(~{est[m]:.1f}s>{max(left, 0):.1f}s left)")
            continue
        nll = save_nll if m == owner else None
        if m == "ttt":
            results[m] = eval_ttt(model, val, cfg, d, log, deadline, nll)
        else:
            results[m] = evaluate(model, val, cfg, d, cfg.eval_stride, m, slot=cfg.slot if m == slot_name else "off",
                                  log=log, save_nll=nll, deadline=deadline)
    total = time.perf_counter() - start
    phases = " ".join(f"{k}:{v['seconds']:.1f}s" for k, v in results.items())
    log(f"eval_phases: {phases} total:{total:.1f}s budget:{cfg.eval_budget_s:.0f}s "
        f"{'within' if total <= cfg.eval_budget_s else 'OVER'} skipped:{','.join(skipped) or 'none'}")
    return {"modes": results, "primary": owner}


def write_submission(cfg: Config, d: Dist, ev: dict, art: dict, train_info: dict, log: Log, preset: str) -> None:
    if not d.main:
        return
    base = dataclasses.asdict(build_config(preset, env={}))  # what environment and flags changed, so the run can be redone
    overrides = {k: v for k, v in dataclasses.asdict(cfg).items() if v != base[k] and k not in ("run_dir", "data_path", "tokenizer_path")}
    p = ev["modes"][ev["primary"]]
    hw = torch.cuda.get_device_name(d.device) if d.device.type == "cuda" else "cpu"
    sub = {
        "name": "HybridQuantGPT v6.1 (clean-room)", "val_bpb": p["val_bpb"], "val_loss": p["val_loss"],
        "score_mode": ev["primary"], "record_legal": all(v["legal"] for v in ev["modes"].values()),
        "eval_modes": {k: {"val_bpb": v["val_bpb"], "val_loss": v["val_loss"], "seconds": round(v["seconds"], 1),
                           "record_legal": v["legal"]} for k, v in ev["modes"].items()},
        "bytes_total": art["bytes_total"], "bytes_code": art["bytes_code"], "bytes_model": art["bytes_model"],
        **{k: art[k] for k in ("bytes_code_source", "code_sha256") if k in art},  # bytes_code: the packed script's
        "steps": train_info["steps"], "wallclock_seconds": round(train_info["train_time"], 1),
        "hardware": f"{d.world}x {hw}", "date": time.strftime("%Y-%m-%d"), "seed": cfg.seed,
        "data_path": cfg.data_path, "command": " ".join(sys.argv), "preset": preset, "overrides": overrides,
    }
    if not sub["record_legal"]:
        sub["compliance_note"] = "an eval mode that fails C3 (reference SLOT) ran; its number is not a record score"
    atomic_write(Path(cfg.run_dir) / "submission.json", (json.dumps(sub, indent=2) + "\n").encode())
    log(f"saved:{Path(cfg.run_dir) / 'submission.json'} score_mode:{ev['primary']} val_bpb:{p['val_bpb']:.8f}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Every Config field is also a flag (--matrix-lr) and an environment variable (MATRIX_LR).")
    ap.add_argument("--preset", default=os.environ.get("PRESET", "h100"), help=f"one of {', '.join(PRESETS)} (default h100)")
    ap.add_argument("--resume", metavar="CKPT", help="continue training from a ckpt_step*.pt")
    ap.add_argument("--eval-only", metavar="ARTIFACT", help="evaluate an artifact (model.hqa); no training")
    ap.add_argument("--overwrite", action="store_true", help="replace the run in RUN_DIR (with --eval-only: its eval.log), "
                    "whose files are removed first; without it, a RUN_DIR that holds one is refused")
    ap.add_argument("--save-nll", metavar="PATH", help="write the scored per-target NLL (float64 nats) as .npy")
    ap.add_argument("--pack", metavar="DIR", help="write a records folder (new or empty) and exit: the self-extracting "
                    "train_gpt.py (all counted code), requirements.txt, README.md, submission.json, the runs' logs")
    ap.add_argument("--pack-runs", metavar="RUN[,RUN...]", help="with --pack: run folders (submission.json, train.log), "
                    "one per seed, whose results and logs go into the records folder")
    for f in fields(Config):
        ap.add_argument("--" + f.name.replace("_", "-"), dest=f.name, metavar=f.name.upper(), default=None)
    args = ap.parse_args(argv)
    d = None
    try:
        if args.pack is not None or args.pack_runs is not None:
            if args.pack is None or args.resume or args.eval_only or args.save_nll or args.overwrite:
                raise InputError("--pack DIR [--pack-runs RUN,...] takes no --resume, --eval-only, --save-nll or --overwrite"
                                 if args.pack else "--pack-runs needs --pack DIR")
            if globals().get("__packed_file__"):
                raise InputError("--pack packs the source tree; this is a packed train_gpt.py")
            import packing
            try:
                print(packing.write_records(args.pack, args.pack_runs, Path(__file__).resolve().parent, CODE_FILES))
            except packing.PackError as e:
                raise InputError(str(e)) from None
            return
        flags = {f.name: getattr(args, f.name) for f in fields(Config)}
        cfg = build_config(args.preset, flags)
        d = init_dist()
        inductor_mode = fast.tune_inductor(d.device)
        evals = {}
        if args.eval_only:  # the artifact sets the model (and its vocabulary) that the inputs are checked against
            t = time.perf_counter()
            model, mcfg = d.agree(lambda: load_artifact(args.eval_only, d.device, evals))
            load_s = time.perf_counter() - t
            for k in MODEL_FIELDS:
                setattr(cfg, k, getattr(mcfg, k))
        d.agree(lambda: check_tokenizer(cfg))  # the inputs, before the run folder is touched
        check_shards(shard_files(cfg.data_path, "val") + ([] if args.eval_only else shard_files(cfg.data_path, "train")),
                     cfg.vocab_size, d)
        # a bad or mismatched --resume checkpoint is refused before the run folder is touched, on every rank alike
        ck = d.agree(lambda: load_checkpoint(args.resume, d.device, cfg)) if args.resume and not args.eval_only else None
        ours = ("eval.log",) if args.eval_only else () if args.resume else RUN_FILES  # a resumed run continues its folder
        claimed = d.agree(lambda: claim_run_dir(cfg.run_dir, ours, args.overwrite), main_only=True)  # rank 0's line
        log = Log(d, str(Path(cfg.run_dir) / ("eval.log" if args.eval_only else "train.log")))
        log(f"inductor:{inductor_mode}")
        log(claimed)
        if args.eval_only:
            given = {k for k in EVAL_FIELDS if explicit(k, flags)}
            changed = " ".join(f"{k.upper()}={getattr(cfg, k)}(artifact:{v})" for k, v in evals.items()
                               if k in given and v != getattr(cfg, k))
            for k, v in evals.items():
                if k not in given:
                    setattr(cfg, k, v)
            log("eval_settings: " + ("the artifact's" if evals else "the preset's (this artifact records none)") +
                f" overridden:{changed or 'none'}")
            log(f"eval_phase:load_artifact {load_s:.1f}s path:{args.eval_only} "
                f"bytes:{os.path.getsize(args.eval_only)} model_params:{sum(p.numel() for p in model.parameters())}")
            final_eval(model, cfg, d, log, args.save_nll)
            return
        fast.select_mlp_kernels(cfg.fused_kernels, cfg.cutlass_mlp, d.device, log)
        model, train_info = train(cfg, d, log, ck)
        evaluate(model, ValData(cfg), cfg, d, cfg.eval_seq_len, "raw", log=log)
        path, art = write_artifact(model, cfg, d, log, train_info["gptq"])
        t = time.perf_counter()
        qmodel, _ = load_artifact(path, d.device)
        log(f"eval_phase:load_artifact {time.perf_counter() - t:.1f}s")
        ev = final_eval(qmodel, cfg, d, log, args.save_nll)
        if d.main:
            art["bytes_total"] = art["bytes_model"] + art["bytes_code"]
        write_submission(cfg, d, ev, art, train_info, log, args.preset)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        if d is not None and d.world > 1 and dist.is_initialized():
            dist.barrier()  # no rank tears down gloo/NCCL while another is still in a collective
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
