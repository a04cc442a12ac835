"""A plain PyTorch reference of Qwen-VL, written from the architecture notes, for parity tests.

No vLLM layers and no code from `server.qwen_vl`: tensors are read straight from the checkpoint
files, every operation is spelled out (explicit softmax attention, rotate-half RoPE, fp32
RMSNorm), and images are preprocessed with torchvision like the published pipeline. It runs in
float32 and recomputes the whole sequence for every generated token: slow, simple, obviously
right.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms

IMG_START, IMG_END, IMG_PAD = 151857, 151858, 151859
N_QUERIES = 256
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def load_checkpoint(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json as a dict, every tensor as float32) from a safetensors or .bin checkpoint."""
    config = json.loads((path / "config.json").read_text())
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        from safetensors.torch import load_file

        tensors.update(load_file(str(file)))
    for file in sorted(path.glob("pytorch_model*.bin")):
        tensors.update(torch.load(file, map_location="cpu", weights_only=True))
    return config, {name: t.float() for name, t in tensors.items()}


def preprocess(image: Image.Image, size: int = 448) -> torch.Tensor:
    """The published transform: RGB, bicubic resize to a square, ToTensor, CLIP Normalize."""
    transform = transforms.Compose(
        [
            transforms.Resize((size, size), interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.ToTensor(),
            transforms.Normalize(CLIP_MEAN, CLIP_STD),
        ]
    )
    return transform(image.convert("RGB"))


def expand_image_pairs(ids: list[int]) -> list[int]:
    """Replace every adjacent <img></img> pair by <img> + 256 <imgpad> + </img>."""
    out: list[int] = []
    i = 0
    while i < len(ids):
        if ids[i] == IMG_START and i + 1 < len(ids) and ids[i + 1] == IMG_END:
            out += [IMG_START] + [IMG_PAD] * N_QUERIES + [IMG_END]
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def _layer_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-6) * w + b


def _rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps) * w


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """q [.., Lq, H, D], k/v [.., Lk, H, D] -> [.., Lq, H, D] with an explicit softmax."""
    scores = torch.einsum("...qhd,...khd->...hqk", q, k) / math.sqrt(q.shape[-1])
    if causal:
        lq, lk = q.shape[-3], k.shape[-3]
        mask = torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq)
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("...hqk,...khd->...qhd", scores.softmax(-1), v)


def _resize_table(table: torch.Tensor, side: int) -> torch.Tensor:
    """Bicubic (align_corners=False) resize of a square [n*n, C] table to [side*side, C]."""
    n = int(math.isqrt(table.shape[0]))
    grid = table.reshape(1, n, n, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(side, side), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(side * side, -1)


class ReferenceQwenVL:
    def __init__(self, config: dict, tensors: dict[str, torch.Tensor]) -> None:
        self.c = config
        self.v = config["visual"]
        self.t = tensors

    # --- vision ---------------------------------------------------------------------------

    def vision(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] normalized pixels -> [B, 256, output_dim] image embeddings."""
        t, v = self.t, self.v
        p = "transformer.visual."
        x = F.conv2d(pixels.float(), t[p + "conv1.weight"], stride=v["patch_size"])
        batch, width, gh, gw = x.shape
        x = x.reshape(batch, width, gh * gw).transpose(1, 2)
        x = x + _resize_table(t[p + "positional_embedding"], gh)
        x = _layer_norm(x, t[p + "ln_pre.weight"], t[p + "ln_pre.bias"])
        heads = v["heads"]
        head_dim = width // heads
        for i in range(v["layers"]):
            b = f"{p}transformer.resblocks.{i}."
            h = _layer_norm(x, t[b + "ln_1.weight"], t[b + "ln_1.bias"])
            qkv = F.linear(h, t[b + "attn.in_proj.weight"], t[b + "attn.in_proj.bias"])
            # The fused rows are per head: [q_h, k_h, v_h] for each head in turn.
            q, k, vv = qkv.view(batch, gh * gw, heads, 3 * head_dim).split(head_dim, dim=-1)
            a = _attention(q, k, vv, causal=False).reshape(batch, gh * gw, width)
            x = x + F.linear(a, t[b + "attn.out_proj.weight"], t[b + "attn.out_proj.bias"])
            h = _layer_norm(x, t[b + "ln_2.weight"], t[b + "ln_2.bias"])
            h = F.gelu(F.linear(h, t[b + "mlp.c_fc.weight"], t[b + "mlp.c_fc.bias"]))
            x = x + F.linear(h, t[b + "mlp.c_proj.weight"], t[b + "mlp.c_proj.bias"])
        x = self._resampler(x, gh)
        x = _layer_norm(x, t[p + "ln_post.weight"], t[p + "ln_post.bias"])
        return x @ t[p + "proj"]

    def _resampler(self, x: torch.Tensor, grid: int) -> torch.Tensor:
        t = self.t
        p = "transformer.visual.attn_pool."
        dim = self.v["output_dim"]
        if p + "kv_proj.weight" in t:
            x = F.linear(x, t[p + "kv_proj.weight"])
        kv = _layer_norm(x, t[p + "ln_kv.weight"], t[p + "ln_kv.bias"])
        pos = t[p + "pos_embed"]
        query = _layer_norm(t[p + "query"], t[p + "ln_q.weight"], t[p + "ln_q.bias"]) + pos
        key_in = kv + _resize_table(pos, grid)
        wq, wk, wv = t[p + "attn.in_proj_weight"].chunk(3)
        bq, bk, bv = t[p + "attn.in_proj_bias"].chunk(3)
        heads, batch = dim // 128, x.shape[0]
        q = F.linear(query, wq, bq).view(1, -1, heads, 128).expand(batch, -1, -1, -1)
        k = F.linear(key_in, wk, bk).view(batch, -1, heads, 128)
        v = F.linear(kv, wv, bv).view(batch, -1, heads, 128)
        out = _attention(q, k, v, causal=False).reshape(batch, -1, dim)
        return F.linear(out, t[p + "attn.out_proj.weight"], t[p + "attn.out_proj.bias"])

    # --- language model -------------------------------------------------------------------

    def hidden_states(self, ids: list[int], image_embeds: torch.Tensor | None) -> torch.Tensor:
        """Final-norm hidden states [L, hidden] of a prompt whose images are already expanded."""
        t, c = self.t, self.c
        x = t["transformer.wte.weight"][torch.tensor(ids)]
        pads = [i for i, tok in enumerate(ids) if tok == IMG_PAD]
        if pads:
            assert image_embeds is not None and image_embeds.shape[0] * N_QUERIES == len(pads)
            x[torch.tensor(pads)] = image_embeds.reshape(-1, image_embeds.shape[-1])
        heads, head_dim = c["num_attention_heads"], c["kv_channels"]
        eps = c["layer_norm_epsilon"]
        cos, sin = self._rope(len(ids), head_dim)
        for i in range(c["num_hidden_layers"]):
            b = f"transformer.h.{i}."
            h = _rms_norm(x, t[b + "ln_1.weight"], eps)
            qkv = F.linear(h, t[b + "attn.c_attn.weight"], t[b + "attn.c_attn.bias"])
            q, k, v = (y.view(len(ids), heads, head_dim) for y in qkv.chunk(3, dim=-1))
            q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
            a = _attention(q, k, v, causal=True).reshape(len(ids), heads * head_dim)
            x = x + F.linear(a, t[b + "attn.c_proj.weight"])
            h = _rms_norm(x, t[b + "ln_2.weight"], eps)
            up = F.linear(h, t[b + "mlp.w1.weight"])
            gate = F.silu(F.linear(h, t[b + "mlp.w2.weight"]))
            x = x + F.linear(up * gate, t[b + "mlp.c_proj.weight"])
        return _rms_norm(x, t["transformer.ln_f.weight"], eps)

    def prompt_logprobs(self, ids: list[int], image_embeds: torch.Tensor | None) -> torch.Tensor:
        """log p(ids[i] | ids[:i]) for i = 1..L-1."""
        h = self.hidden_states(ids, image_embeds)[:-1]
        target = torch.tensor(ids[1:])
        out = []
        for start in range(0, len(target), 64):  # chunks keep [rows, 151936] small
            logits = F.linear(h[start : start + 64], self.t["lm_head.weight"])
            lp = logits.log_softmax(-1)
            out.append(lp.gather(1, target[start : start + 64, None]).squeeze(1))
        return torch.cat(out)

    def greedy(self, ids: list[int], image_embeds: torch.Tensor | None, n: int) -> list[int]:
        ids = list(ids)
        generated: list[int] = []
        for _ in range(n):
            h = self.hidden_states(ids, image_embeds)[-1]
            token = int(F.linear(h, self.t["lm_head.weight"]).argmax())
            generated.append(token)
            ids.append(token)
        return generated

    def _rope(self, length: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        rot = int(head_dim * self.c.get("rotary_pct", 1.0))
        base = self.c.get("rotary_emb_base", 10000)
        inv_freq = 1.0 / base ** (torch.arange(0, rot, 2, dtype=torch.float64) / rot)
        freqs = torch.outer(torch.arange(length, dtype=torch.float64), inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().float()[:, None, :], emb.sin().float()[:, None, :]


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    half = rot // 2
    rotated = torch.cat([-x_rot[..., half:], x_rot[..., :half]], dim=-1)
    return torch.cat([x_rot * cos + rotated * sin, x_pass], dim=-1)
