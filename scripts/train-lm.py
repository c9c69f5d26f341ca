#!/usr/bin/env python3
"""Trains sonde's embedded default language model: a small Mixtral-layout Mixture-of-Experts
transformer on the Debian `fortunes` corpus, and writes it as models/fortune-moe.gguf.

Run with Debian's python3 (python3-torch, python3-numpy) after `apt-get install fortunes`:
  /usr/bin/python3 scripts/train-lm.py
Nothing is downloaded. With a fixed seed the vocabulary, the data order and the initial weights are
the same on every run; the trained weights should repeat on the same torch build and thread count
(not checked bit for bit: a run takes a while on shared cores).

What it writes is what llama.cpp's `llama` architecture reads (and sonde's LanguageModel):
- a SentencePiece-style vocabulary (tokenizer.ggml.model 'llama'): <unk> <s> </s>, the 256 byte
  tokens <0x00>..<0xFF> (byte fallback, so any UTF-8 text round-trips), the corpus' printable
  characters, then BPE pieces whose scores are minus their merge rank. Spaces are '▁' and a '▁' is
  put in front of the text, as llama.cpp's SPM tokenizer does; the corpus is tokenised here with
  that same algorithm (the highest-scoring adjacent pair that is a piece merges first), so training
  and inference see the same tokens.
- RMSNorm, grouped-query attention with RoPE in llama.cpp's normal (adjacent-pair) ordering, and per
  layer a softmax router over E experts of which the top k run (SwiGLU), their weights renormalised
  to sum to 1 (llama.cpp does so for Mixtral-layout `llama` models). Expert weights are stacked in
  blk.N.ffn_{gate,up,down}_exps.
- Matrices in Q8_0 (blocks of 32 with an f16 scale), norms and routers in f32: a few MB.
"""
import collections
import math
import os
import random
import re
import struct
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

SEED = 20251125
CORPUS_DIR = "/usr/share/games/fortunes"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_PATH = os.path.join(ROOT, "models", "fortune-moe.gguf")

VOCAB_SIZE = 1024
# A character becomes a piece of its own only if it is common; rarer ones (and control characters:
# tabs, the backspaces of overstruck text) go through byte fallback.
MIN_CHAR_COUNT = 20

D_MODEL = 128
LAYERS = 4
HEADS = 4
KV_HEADS = 2
EXPERTS = 8
EXPERTS_USED = 2
EXPERT_FF = 128
CONTEXT = 128
ROPE_BASE = 10000.0
NORM_EPS = 1e-5

BATCH = 16
STEPS = 260
LR = 3e-3
WARMUP = 30
# Switch-transformer load-balancing loss: keeps the router from sending everything to a few experts.
BALANCE_WEIGHT = 0.01
THREADS = 2

SPACE = "\u2581"
UNK, BOS, EOS = 0, 1, 2
BYTE0 = 3


def load_corpus():
    names = sorted(f for f in os.listdir(CORPUS_DIR)
                   if "." not in f and not os.path.islink(os.path.join(CORPUS_DIR, f)))
    if not names:
        sys.exit(f"no fortune files in {CORPUS_DIR}: apt-get install fortunes")
    docs = []
    for name in names:
        with open(os.path.join(CORPUS_DIR, name), encoding="utf-8", errors="replace") as f:
            for doc in f.read().split("\n%\n"):
                doc = doc.strip("\n%")
                # Overstruck text (x\bx) and bells are terminal effects, not text.
                if doc and "\b" not in doc and "\a" not in doc:
                    docs.append(doc)
    return names, docs


def spm_text(doc):
    return SPACE + doc.replace(" ", SPACE)


def segments(text, base):
    """Pieces never contain '\n' or a non-base character, and '▁' only first: the units BPE sees."""
    out = []
    for seg in re.findall(f"\n|{SPACE}[^{SPACE}\n]*|[^{SPACE}\n]+", text):
        cur = ""
        for ch in seg:
            if ch in base:
                cur += ch
            else:
                if cur:
                    out.append(cur)
                out.append(ch)
                cur = ""
        if cur:
            out.append(cur)
    return out


def train_bpe(seg_counts, base, n_merges):
    words = [[list(w), c] for w, c in seg_counts.items() if all(ch in base for ch in w) and len(w) > 1]
    pairs = collections.Counter()
    where = collections.defaultdict(set)
    for i, (syms, c) in enumerate(words):
        for a, b in zip(syms, syms[1:]):
            pairs[(a, b)] += c
            where[(a, b)].add(i)
    merges = []
    for _ in range(n_merges):
        if not pairs:
            break
        # Ties broken by the pair itself so the vocabulary does not depend on hash order.
        best = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))[0]
        if pairs[best] < 2:
            break
        merges.append(best)
        a, b = best
        for i in list(where[best]):
            syms, c = words[i]
            for x, y in zip(syms, syms[1:]):
                pairs[(x, y)] -= c
                if pairs[(x, y)] <= 0:
                    del pairs[(x, y)]
            j, out = 0, []
            while j < len(syms):
                if j + 1 < len(syms) and syms[j] == a and syms[j + 1] == b:
                    out.append(a + b)
                    j += 2
                else:
                    out.append(syms[j])
                    j += 1
            words[i][0] = out
            for x, y in zip(out, out[1:]):
                pairs[(x, y)] += c
                where[(x, y)].add(i)
        where.pop(best, None)
    return merges


def spm_encode_segment(seg, piece_id, score):
    """llama.cpp's SPM merge loop on one segment: merge the adjacent pair whose concatenation is the
    highest-scoring piece (leftmost on ties), until none is; then pieces, or bytes for the rest."""
    syms = list(seg)
    while True:
        best, best_i = None, -1
        for i in range(len(syms) - 1):
            s = score.get(syms[i] + syms[i + 1])
            if s is not None and (best is None or s > best):
                best, best_i = s, i
        if best is None:
            break
        syms[best_i:best_i + 2] = [syms[best_i] + syms[best_i + 1]]
    ids = []
    for s in syms:
        if s in piece_id:
            ids.append(piece_id[s])
        else:
            ids.extend(BYTE0 + b for b in s.encode("utf-8"))
    return ids


def build_vocab(docs):
    texts = [spm_text(d) for d in docs]
    chars = collections.Counter(ch for t in texts for ch in t)
    base = sorted(ch for ch, c in chars.items() if c >= MIN_CHAR_COUNT and ch.isprintable() and ch != " ")
    base_set = set(base)
    seg_counts = collections.Counter(s for t in texts for s in segments(t, base_set))
    merges = train_bpe(seg_counts, base_set, VOCAB_SIZE - BYTE0 - 256 - len(base))
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    scores = [0.0] * len(tokens)
    types = [2, 3, 3] + [6] * 256
    # Characters score below every merge: the scores of single characters are never compared in
    # the merge loop, only looked up.
    for ch in base:
        tokens.append(ch)
        scores.append(-1e6)
        types.append(1)
    for rank, (a, b) in enumerate(merges):
        tokens.append(a + b)
        scores.append(-float(rank))
        types.append(1)
    piece_id = {t: i for i, t in enumerate(tokens) if types[i] == 1}
    score = {t: scores[i] for t, i in piece_id.items()}
    cache = {}
    encoded = []
    for t in texts:
        ids = [BOS]
        for seg in segments(t, base_set):
            if seg not in cache:
                cache[seg] = spm_encode_segment(seg, piece_id, score)
            ids.extend(cache[seg])
        ids.append(EOS)
        encoded.append(ids)
    return tokens, scores, types, encoded, len(base), len(merges)


def rope_tables(head_dim, length):
    inv = ROPE_BASE ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    ang = torch.arange(length, dtype=torch.float32)[:, None] * inv[None, :]
    return ang.cos(), ang.sin()


def rope(x, cos, sin):
    # llama.cpp's normal mode rotates adjacent pairs (x[2i], x[2i+1]).
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2)


class RMSNorm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + NORM_EPS) * self.weight


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        hd = D_MODEL // HEADS
        self.attn_norm = RMSNorm(D_MODEL)
        self.q = nn.Linear(D_MODEL, HEADS * hd, bias=False)
        self.k = nn.Linear(D_MODEL, KV_HEADS * hd, bias=False)
        self.v = nn.Linear(D_MODEL, KV_HEADS * hd, bias=False)
        self.o = nn.Linear(HEADS * hd, D_MODEL, bias=False)
        self.ffn_norm = RMSNorm(D_MODEL)
        self.router = nn.Linear(D_MODEL, EXPERTS, bias=False)
        # [expert, out, in]: the row-major order GGUF stores a stacked ffn_*_exps tensor in.
        s_in, s_ff = D_MODEL ** -0.5, EXPERT_FF ** -0.5
        self.gate = nn.Parameter(torch.randn(EXPERTS, EXPERT_FF, D_MODEL) * s_in)
        self.up = nn.Parameter(torch.randn(EXPERTS, EXPERT_FF, D_MODEL) * s_in)
        self.down = nn.Parameter(torch.randn(EXPERTS, D_MODEL, EXPERT_FF) * s_ff / math.sqrt(2 * LAYERS))

    def forward(self, x, cos, sin):
        b, t, _ = x.shape
        hd = D_MODEL // HEADS
        h = self.attn_norm(x)
        q = rope(self.q(h).view(b, t, HEADS, hd), cos, sin).transpose(1, 2)
        k = rope(self.k(h).view(b, t, KV_HEADS, hd), cos, sin).transpose(1, 2)
        v = self.v(h).view(b, t, KV_HEADS, hd).transpose(1, 2)
        k = k.repeat_interleave(HEADS // KV_HEADS, dim=1)
        v = v.repeat_interleave(HEADS // KV_HEADS, dim=1)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        mask = torch.ones(t, t, dtype=torch.bool).triu(1)
        att = att.masked_fill(mask, float("-inf")).softmax(-1)
        x = x + self.o((att @ v).transpose(1, 2).reshape(b, t, HEADS * hd))

        h = self.ffn_norm(x).reshape(b * t, D_MODEL)
        probs = self.router(h).softmax(-1)
        top_w, top_i = probs.topk(EXPERTS_USED, dim=-1)
        top_w = top_w / top_w.sum(-1, keepdim=True)
        out = torch.zeros_like(h)
        for e in range(EXPERTS):
            rows, slot = (top_i == e).nonzero(as_tuple=True)
            if rows.numel() == 0:
                continue
            he = h[rows]
            y = (F.silu(he @ self.gate[e].T) * (he @ self.up[e].T)) @ self.down[e].T
            out.index_add_(0, rows, y * top_w[rows, slot, None])
        # Fraction of routed slots per expert times its mean router probability (Switch, eq. 4).
        share = F.one_hot(top_i, EXPERTS).float().sum(1).mean(0) / EXPERTS_USED
        balance = EXPERTS * (share * probs.mean(0)).sum()
        return x + out.view(b, t, D_MODEL), balance, share.detach()


class Model(nn.Module):
    def __init__(self, vocab):
        super().__init__()
        self.embed = nn.Embedding(vocab, D_MODEL)
        nn.init.normal_(self.embed.weight, std=1.0)
        self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
        self.norm = RMSNorm(D_MODEL)
        self.output = nn.Linear(D_MODEL, vocab, bias=False)
        cos, sin = rope_tables(D_MODEL // HEADS, CONTEXT)
        self.register_buffer("cos", cos)
        self.register_buffer("sin", sin)

    def forward(self, ids):
        t = ids.shape[1]
        cos, sin = self.cos[:t, None, :], self.sin[:t, None, :]
        x = self.embed(ids)
        balance, shares = 0.0, []
        for blk in self.blocks:
            x, bal, share = blk(x, cos, sin)
            balance = balance + bal
            shares.append(share)
        return self.output(self.norm(x)), balance / LAYERS, torch.stack(shares)


# --- GGUF (v3): header, metadata, tensor infos, padding, data ---------------------------------------
GGUF_U32, GGUF_F32, GGUF_BOOL, GGUF_STR, GGUF_ARR, GGUF_I32 = 4, 6, 7, 8, 9, 5
GGML_F32, GGML_Q8_0 = 0, 8
ALIGN = 32


def gguf_str(s):
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def gguf_value(kind, v):
    if kind == GGUF_U32:
        return struct.pack("<I", v)
    if kind == GGUF_I32:
        return struct.pack("<i", v)
    if kind == GGUF_F32:
        return struct.pack("<f", v)
    if kind == GGUF_BOOL:
        return struct.pack("<?", v)
    if kind == GGUF_STR:
        return gguf_str(v)
    raise ValueError(kind)


def gguf_kv(key, kind, v, elem=None):
    out = gguf_str(key) + struct.pack("<I", kind)
    if kind == GGUF_ARR:
        out += struct.pack("<IQ", elem, len(v))
        if elem == GGUF_F32:
            return out + np.asarray(v, dtype="<f4").tobytes()
        if elem == GGUF_I32:
            return out + np.asarray(v, dtype="<i4").tobytes()
        return out + b"".join(gguf_value(elem, x) for x in v)
    return out + gguf_value(kind, v)


def q8_0(a):
    """Rows of the last axis in blocks of 32: an f16 scale max|x|/127, then 32 int8 (x / scale)."""
    blocks = a.astype(np.float32).reshape(-1, 32)
    d = np.abs(blocks).max(axis=1) / 127.0
    # The scale is stored as f16: quantise with the rounded scale the reader multiplies by.
    d16 = d.astype(np.float16)
    inv = np.where(d16 > 0, 1.0 / np.maximum(d16.astype(np.float32), 1e-30), 0.0)
    q = np.clip(np.rint(blocks * inv[:, None]), -127, 127).astype(np.int8)
    rec = np.empty(len(blocks), dtype=[("d", "<f2"), ("q", "i1", 32)])
    rec["d"], rec["q"] = d16, q
    return rec.tobytes()


def write_gguf(path, metadata, tensors):
    """tensors: (name, numpy array in row-major [.., rows, cols], ggml type); GGUF dims are reversed."""
    infos, datas, offset = b"", [], 0
    for name, arr, kind in tensors:
        data = q8_0(arr) if kind == GGML_Q8_0 else arr.astype("<f4").tobytes()
        dims = list(reversed(arr.shape))
        infos += gguf_str(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
        infos += struct.pack("<IQ", kind, offset)
        pad = (-len(data)) % ALIGN
        datas.append(data + b"\0" * pad)
        offset += len(data) + pad
    header = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata)) + b"".join(metadata) + infos
    header += b"\0" * ((-len(header)) % ALIGN)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(header)
        for d in datas:
            f.write(d)
    os.replace(tmp, path)


def export(model, tokens, scores, types, path):
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    hd = D_MODEL // HEADS
    md = [
        gguf_kv("general.architecture", GGUF_STR, "llama"),
        gguf_kv("general.name", GGUF_STR, "sonde fortune-moe"),
        gguf_kv("general.file_type", GGUF_U32, 7),  # mostly Q8_0
        gguf_kv("llama.context_length", GGUF_U32, CONTEXT),
        gguf_kv("llama.embedding_length", GGUF_U32, D_MODEL),
        gguf_kv("llama.block_count", GGUF_U32, LAYERS),
        gguf_kv("llama.feed_forward_length", GGUF_U32, EXPERT_FF),
        gguf_kv("llama.attention.head_count", GGUF_U32, HEADS),
        gguf_kv("llama.attention.head_count_kv", GGUF_U32, KV_HEADS),
        gguf_kv("llama.attention.layer_norm_rms_epsilon", GGUF_F32, NORM_EPS),
        gguf_kv("llama.rope.freq_base", GGUF_F32, ROPE_BASE),
        gguf_kv("llama.rope.dimension_count", GGUF_U32, hd),
        gguf_kv("llama.expert_count", GGUF_U32, EXPERTS),
        gguf_kv("llama.expert_used_count", GGUF_U32, EXPERTS_USED),
        gguf_kv("llama.vocab_size", GGUF_U32, len(tokens)),
        gguf_kv("tokenizer.ggml.model", GGUF_STR, "llama"),
        gguf_kv("tokenizer.ggml.tokens", GGUF_ARR, tokens, GGUF_STR),
        gguf_kv("tokenizer.ggml.scores", GGUF_ARR, scores, GGUF_F32),
        gguf_kv("tokenizer.ggml.token_type", GGUF_ARR, types, GGUF_I32),
        gguf_kv("tokenizer.ggml.bos_token_id", GGUF_U32, BOS),
        gguf_kv("tokenizer.ggml.eos_token_id", GGUF_U32, EOS),
        gguf_kv("tokenizer.ggml.unknown_token_id", GGUF_U32, UNK),
        gguf_kv("tokenizer.ggml.add_bos_token", GGUF_BOOL, True),
        gguf_kv("tokenizer.ggml.add_eos_token", GGUF_BOOL, False),
        gguf_kv("tokenizer.ggml.add_space_prefix", GGUF_BOOL, True),
    ]
    t = [("token_embd.weight", sd["embed.weight"], GGML_Q8_0)]
    for l in range(LAYERS):
        p, b = f"blocks.{l}.", f"blk.{l}."
        t += [
            (b + "attn_norm.weight", sd[p + "attn_norm.weight"], GGML_F32),
            (b + "attn_q.weight", sd[p + "q.weight"], GGML_Q8_0),
            (b + "attn_k.weight", sd[p + "k.weight"], GGML_Q8_0),
            (b + "attn_v.weight", sd[p + "v.weight"], GGML_Q8_0),
            (b + "attn_output.weight", sd[p + "o.weight"], GGML_Q8_0),
            (b + "ffn_norm.weight", sd[p + "ffn_norm.weight"], GGML_F32),
            # The router stays f32, as llama.cpp's converters keep it: its scores pick the experts.
            (b + "ffn_gate_inp.weight", sd[p + "router.weight"], GGML_F32),
            (b + "ffn_gate_exps.weight", sd[p + "gate"], GGML_Q8_0),
            (b + "ffn_up_exps.weight", sd[p + "up"], GGML_Q8_0),
            (b + "ffn_down_exps.weight", sd[p + "down"], GGML_Q8_0),
        ]
    t += [("output_norm.weight", sd["norm.weight"], GGML_F32), ("output.weight", sd["output.weight"], GGML_Q8_0)]
    write_gguf(path, md, t)


def main():
    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)
    torch.set_num_threads(THREADS)
    t0 = time.time()
    names, docs = load_corpus()
    tokens, scores, types, encoded, n_chars, n_merges = build_vocab(docs)
    stream = []
    order = list(range(len(encoded)))
    random.shuffle(order)
    for i in order:
        stream.extend(encoded[i])
    data = torch.tensor(stream, dtype=torch.long)
    # The last 5% of the shuffled stream is held out to report a validation loss.
    split = int(len(data) * 0.95)
    train, valid = data[:split], data[split:]
    chars = sum(len(d) for d in docs)
    print(f"corpus: {len(names)} files, {len(docs)} fortunes, {chars} characters -> {len(data)} tokens "
          f"({chars / (len(data) - 2 * len(docs)):.2f} characters/token); vocabulary {len(tokens)} "
          f"(3 control, 256 bytes, {n_chars} characters, {n_merges} merges) in {time.time() - t0:.1f} s", flush=True)

    model = Model(len(tokens))
    params = sum(p.numel() for p in model.parameters())
    expert_params = sum(p.numel() for n, p in model.named_parameters() if n.split(".")[-1] in ("gate", "up", "down"))
    active = params - expert_params + expert_params * EXPERTS_USED // EXPERTS - len(tokens) * D_MODEL
    print(f"model: {params} parameters ({expert_params} in experts; {active} active per token without the "
          f"embedding lookup), {LAYERS} layers, d_model {D_MODEL}, {HEADS} heads / {KV_HEADS} KV heads, "
          f"{EXPERTS} experts of {EXPERT_FF} top-{EXPERTS_USED}", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / WARMUP) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, s / STEPS)))))
    gen = torch.Generator().manual_seed(SEED)
    t_train = time.time()
    loss_avg = None
    for step in range(STEPS):
        starts = torch.randint(0, len(train) - CONTEXT - 1, (BATCH,), generator=gen)
        batch = torch.stack([train[s:s + CONTEXT + 1] for s in starts.tolist()])
        logits, balance, share = model(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        (loss + BALANCE_WEIGHT * balance).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        loss_avg = loss.item() if loss_avg is None else 0.98 * loss_avg + 0.02 * loss.item()
        if step % 100 == 0 or step == STEPS - 1:
            print(f"step {step:5d}  loss {loss_avg:.3f}  balance {balance.item():.3f}  "
                  f"max expert share {share.max().item():.2f}  {time.time() - t_train:.0f} s", flush=True)
    train_s = time.time() - t_train

    model.eval()
    with torch.no_grad():
        n = (len(valid) - 1) // CONTEXT
        v = valid[: n * CONTEXT + 1]
        xs = v[:-1].view(n, CONTEXT)
        ys = v[1:].view(n, CONTEXT)
        total = 0.0
        for i in range(0, n, 32):
            logits, _, _ = model(xs[i:i + 32])
            total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ys[i:i + 32].reshape(-1), reduction="sum").item()
        valid_loss = total / (n * CONTEXT)
    print(f"trained {STEPS} steps of {BATCH}x{CONTEXT} tokens in {train_s:.0f} s; final train loss {loss_avg:.3f}, "
          f"validation loss {valid_loss:.3f} nats/token (perplexity {math.exp(valid_loss):.1f})", flush=True)

    export(model, tokens, scores, types, OUT_PATH)
    print(f"wrote {os.path.relpath(OUT_PATH, ROOT)} ({os.path.getsize(OUT_PATH)} bytes)")


if __name__ == "__main__":
    main()
