"""GPT-2 that reads images: CLIP tokens → projection → gated cross-attention after every k-th GPT-2 block, and
`build_captioner`, the one way to assemble it (training, captioning and evaluation all call it).

Shapes: B batch, T caption length, C n_embd, N image tokens, D CLIP width.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn as nn

from captioner.errors import UserError, from_hub
from captioner.models import generate as decoding
from captioner.models.attention_maps import AttentionMaps, attention_maps
from captioner.models.checkpoints import load_lm, read_lm
from captioner.models.compact_vocab import build_lm, lm_config
from captioner.models.cross_attention import GatedCrossAttention
from captioner.models.gpt import GPT, GPTConfig, load_checkpoint
from captioner.models.vision import VisionEncoder, load_clip_vision
from captioner.optim import parameter_counts
from captioner.tokenizer import EOT, decode

log = logging.getLogger(__name__)

PARTS = ("xattn", "projection", "vision", "lm")


class Captioner(nn.Module):
    """A GPT-2 LM with GatedCrossAttention after every `cross_every`-th block, reading VisionEncoder tokens.

    `trainable` is the freeze policy applied at construction (see `set_trainable`); the default trains only
    the new layers, the cross-attention and the projection.
    """

    def __init__(
        self,
        lm: GPT,
        vision: VisionEncoder,
        cross_every: int = 2,
        trainable: Iterable[str] = ("xattn", "projection"),
    ):
        super().__init__()
        if vision.proj[0].out_features != lm.config.n_embd:
            raise UserError(
                f"VisionEncoder projects to {vision.proj[0].out_features}, but the LM's n_embd is {lm.config.n_embd}"
            )
        self.lm = lm
        self.vision = vision
        self.lm.insert_cross_attention(
            cross_every, lambda i: GatedCrossAttention(lm.config.n_embd, lm.config.n_head)
        )
        self.set_trainable(trainable)

    def image_context(
        self, pixel_values: torch.Tensor | None = None, features: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Projected image tokens (B, N, C) from pixels (B, 3, H, W) or cached CLIP features (B, N, D)."""
        return self.vision(pixel_values=pixel_values, features=features)

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        features: torch.Tensor | None = None,
        return_logits: bool = True,
        n_targets: int | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """input_ids (B, T); labels (B, T) aligned to input_ids (the next token, -100 on padding).
        Returns logits (B, T, V) and the caption loss (or None). return_logits=False (with labels) returns None
        for the logits and runs the output layer only on the positions with a label, fused with the loss: a
        padded caption batch skips the vocab-wide matmul on its padding. n_targets, the number of labels that
        are not -100 when the caller knows it (the collate counts them), spares that selection a device read."""
        context = self.image_context(pixel_values, features)  # (B, N, C)
        if labels is None or return_logits:
            return self.lm(input_ids, labels, context=context)
        x = self.lm.hidden_states(input_ids, context=context)  # (B, T, C)
        keep = (labels != -100).view(-1)  # (B*T,)
        if n_targets is None:
            rows = keep.nonzero().squeeze(1)  # (M,) M = kept positions; the count is read from the device
        else:
            rows = torch.nonzero_static(keep, size=n_targets).squeeze(1)  # (M,) no device read
        return None, self.lm.output_loss(x.view(-1, x.size(-1))[rows], labels.view(-1)[rows])

    # --- freeze policy ------------------------------------------------------------------------------------
    def _part_parameters(self, part: str) -> list[nn.Parameter]:
        if part == "xattn":
            return list(self.lm.cross.parameters())
        if part == "projection":
            return list(self.vision.proj.parameters())
        if part == "vision":
            return self.vision.clip_parameters()
        if part == "lm":
            return [p for name, p in self.lm.named_parameters() if not name.startswith("cross.")]
        raise UserError(f"unknown trainable part {part!r}; valid parts: {', '.join(PARTS)}")

    def set_trainable(self, parts: Iterable[str]) -> dict[str, int]:
        """Train only `parts` (from "xattn", "projection", "vision", "lm"); freeze the rest.
        Returns {"trainable": n, "frozen": n} parameter counts."""
        chosen = {id(p) for part in parts for p in self._part_parameters(part)}
        for p in self.parameters():
            p.requires_grad_(id(p) in chosen)
        self.vision.train(self.vision.training)  # re-applies "frozen CLIP stays in eval mode"
        return parameter_counts(self)

    # --- captioning ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        pixel_values: torch.Tensor | None = None,
        features: torch.Tensor | None = None,
        *,
        method: str = "greedy",
        max_new_tokens: int = 30,
        num_beams: int = 3,
        length_penalty: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
        cuda_graph: bool = False,
    ) -> list[list[int]]:
        """Caption token ids per image (EOT excluded), decoded from the prompt [EOT] as in training, where a
        sequence is [EOT] + caption + [EOT]. method: "greedy", "beam" or "sample". cuda_graph: replay each
        decode step as a CUDA graph (CUDA only; see models/generate.py)."""
        context = self.image_context(pixel_values, features)  # (B, N, C)
        prompt = torch.full((context.size(0), 1), EOT, dtype=torch.long, device=context.device)  # (B, 1)
        common = dict(
            max_new_tokens=max_new_tokens,
            eot=EOT,
            context=context,
            use_cache=use_cache,
            cuda_graph=cuda_graph,
        )
        if method == "greedy":
            return decoding.generate(self.lm, prompt, decoding.argmax, **common)
        if method == "beam":
            return decoding.beam_search(
                self.lm, prompt, num_beams=num_beams, length_penalty=length_penalty, **common
            )
        if method == "sample":
            pick = decoding.sampler(temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
            return decoding.generate(self.lm, prompt, pick, **common)
        raise UserError(f"unknown decoding method {method!r}; choose greedy, beam or sample")

    def caption(
        self, pixel_values: torch.Tensor | None = None, features: torch.Tensor | None = None, **generation
    ) -> list[str]:
        """Caption text per image; `generation` as in `generate`."""
        return [decode(ids) for ids in self.generate(pixel_values, features, **generation)]


def caption_batch(
    model: Captioner,
    pixel_values: torch.Tensor | None = None,
    features: torch.Tensor | None = None,
    *,
    autocast: bool = True,
    **generation,
) -> list[str]:
    """Caption text per image of one batch, pixels (B, 3, S, S) or cached CLIP features (B, N, D), run where the
    model is: the one captioning path of the API, CLI, server, whole-split evaluation and training's validation.
    `generation`: `Captioner.generate` keywords (see `generation_settings`).

    The images move to the model's device. There, on a GPU with bf16, the model runs under bf16 autocast, as
    training validates; autocast=False leaves precision to the caller's context (training's validation runs
    under Lightning's precision plugin).
    """
    pixel_values, features, precision = _where_model_runs(model, pixel_values, features, autocast)
    with precision:
        return model.caption(pixel_values=pixel_values, features=features, **generation)


def _where_model_runs(model, pixel_values, features, autocast):
    """The images on the model's device and the precision context `caption_batch` documents."""
    device = next(model.parameters()).device
    # from pinned memory (the evaluator's DataLoader pins its batches) the copy is queued, the host goes on
    move = dict(device=device, non_blocking=device.type == "cuda")
    pixel_values = None if pixel_values is None else pixel_values.to(**move)
    features = None if features is None else features.to(**move)
    bf16 = autocast and device.type == "cuda" and torch.cuda.is_bf16_supported()
    # nullcontext, not autocast(enabled=False), which would switch off the caller's autocast
    precision = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    return pixel_values, features, precision


def caption_batch_with_attention(
    model: Captioner,
    pixel_values: torch.Tensor | None = None,
    features: torch.Tensor | None = None,
    *,
    autocast: bool = True,
    **generation,
) -> tuple[list[str], list[AttentionMaps]]:
    """`caption_batch`, and per caption where each of its tokens looked (`attention_maps`: one teacher-forced pass
    over the final captions with explicit attention weights; decoding itself is unchanged). CLIP runs once: its
    features feed both the decoding and the maps."""
    pixel_values, features, precision = _where_model_runs(model, pixel_values, features, autocast)
    with precision:
        if features is None:
            with torch.no_grad():
                features = model.vision.encode(pixel_values)  # (B, N, D)
        ids = model.generate(features=features, **generation)
        maps = attention_maps(model, ids, features=features)
    return [decode(c) for c in ids], maps


# --------------------------------------------------------------------------------------------------------------
# assembling a captioner: configs (plain data, as checkpoints store them) → model, pretrained weights


def generation_settings(saved: dict | None, beams: int | None = None, **overrides) -> dict:
    """`Captioner.generate` keywords: the settings a run was trained with (beam search unless they name a method,
    as validation decodes), then `overrides`, then `beams` (1 → greedy, more → beam search of that width)."""
    settings = {"method": "beam", **(saved or {}), **overrides}
    if beams is not None:
        if isinstance(beams, bool) or not isinstance(beams, int) or beams < 1:
            raise UserError(f"beams must be a whole number ≥ 1, got {beams!r}")
        settings.update(method="greedy") if beams == 1 else settings.update(method="beam", num_beams=beams)
    return settings


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """`device` as a torch.device (default: cuda when available); ValueError for a bad name or absent CUDA."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as err:
        raise UserError(f"--device {device!r}: {err}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device} requested but CUDA is not available")
    return resolved


def resolve_lm(lm: dict) -> dict:
    """Fill `lm["config"]` (the GPT shape) from wherever the weights come from, without loading them: a stage-1
    checkpoint (`ckpt`), an HF GPT-2 (`hf`), or a GPTConfig name/fields (random init)."""
    lm = dict(lm)
    if lm.get("ckpt") and lm.get("hf"):
        raise UserError(f"model.lm: give either ckpt ({lm['ckpt']}) or hf ({lm['hf']}), not both")
    config = lm.get("config")
    if config is not None and not isinstance(config, str) and "name" not in config:
        return lm  # already resolved (e.g. read back from a checkpoint)
    if lm.get("ckpt"):
        lm["config"] = dataclasses.asdict(read_lm(lm["ckpt"])[0])  # any format read_lm reads
    elif lm.get("hf"):
        from transformers import GPT2Config

        lm["config"] = dataclasses.asdict(
            GPTConfig.from_hf(from_hub(GPT2Config.from_pretrained, lm["hf"], "model.lm.hf"), lm["hf"])
        )
    elif config:
        lm["config"] = dataclasses.asdict(lm_config(config, "model.lm.config"))
    else:
        raise UserError(
            "model.lm: no language model given: set model.lm.ckpt=<stage-1 last.ckpt>, model.lm.hf=gpt2 "
            "(or a local HF dir), or model.lm.config=<GPTConfig name> for a randomly initialised LM"
        )
    return lm


def resolve_vision(vision: dict) -> dict:
    """Record CLIP's full architecture (`clip_config`) so that a checkpoint rebuilds it offline."""
    vision = dict(vision)
    if vision.get("clip_config") is None:
        if not vision.get("clip"):
            raise UserError("model.vision: set clip (hub name or local dir) or clip_config (random CLIP)")
        from transformers import CLIPVisionConfig

        config = from_hub(CLIPVisionConfig.from_pretrained, vision["clip"], "model.vision.clip")
        vision["clip_config"] = config.to_dict()
    return vision


def build_captioner(
    lm: dict,
    vision: dict,
    cross_every: int = 2,
    trainable: Iterable[str] = ("xattn", "projection"),
    *,
    pretrained: bool = False,
) -> Captioner:
    """A Captioner from its config dicts (`resolve_lm` / `resolve_vision` forms). Weights are random unless
    `pretrained`, which copies in the stage-1 / HF GPT-2 and the CLIP weights the configs name."""
    lm, vision = resolve_lm(lm), resolve_vision(vision)
    config = lm_config(lm["config"], "model.lm.config")  # a GPT-2, or the demo's compact-vocabulary LM
    encoder = VisionEncoder(config.n_embd, clip=None, clip_config=vision["clip_config"])
    model = Captioner(build_lm(config), encoder, cross_every=cross_every, trainable=trainable)
    if pretrained:
        load_pretrained_weights(model, lm, vision)
    return model


def load_pretrained_weights(model: Captioner, lm: dict, vision: dict) -> None:
    """Copy the LM (stage-1 checkpoint or HF GPT-2) and CLIP weights named by the configs into `model`."""
    source = None
    if lm.get("ckpt"):
        source = load_lm(lm["ckpt"])
    elif lm.get("hf"):
        source = GPT.from_pretrained(lm["hf"])
    if source is not None:
        missing, unexpected = model.lm.load_state_dict(source.state_dict(), strict=False)
        if unexpected or any(not k.startswith("cross.") for k in missing):
            raise UserError(f"LM weights do not fit: missing {missing}, unexpected {unexpected}")
        log.info("language model loaded from %s", lm.get("ckpt") or lm.get("hf"))
    if vision.get("clip"):
        clip = load_clip_vision(vision["clip"], "model.vision.clip")
        model.vision.clip.load_state_dict(clip.state_dict())
        log.info("CLIP loaded from %s", vision["clip"])


CAPTIONER_KEYS = ("lm", "vision", "cross_every", "trainable")

# An exported captioner directory (`captioner-export`): plain-data config + safetensors weights, no pickle.
CONFIG_FILE = "captioner.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "captioner"  # config["format"]: lets a reader tell our directory from a transformers one


def load_captioner(path: str | os.PathLike) -> tuple[Captioner, dict]:
    """A trained captioner, on the CPU in eval mode, and its hyper-parameters (generation settings included),
    from a caption run's Lightning checkpoint or a directory written by `save_captioner`. Needs no
    LightningModule."""
    if Path(path).is_dir():
        return _load_captioner_dir(Path(path))
    ckpt = load_checkpoint(path)
    hparams = ckpt.get("hyper_parameters") or {}
    if not all(key in hparams for key in CAPTIONER_KEYS):
        kind = (
            "a stage-1 (language model) checkpoint, not" if "gpt" in hparams or "model" in hparams else "not"
        )
        raise UserError(
            f"{path}: {kind} a caption checkpoint (hyper_parameters need {', '.join(CAPTIONER_KEYS)}); "
            "pass the last.ckpt of a caption run"
        )
    model = build_captioner(**{key: hparams[key] for key in CAPTIONER_KEYS})
    weights = {
        key.removeprefix("model."): value
        for key, value in (ckpt.get("state_dict") or {}).items()
        if key.startswith("model.")
    }
    model.load_state_dict(weights)
    return model.eval(), dict(hparams)


def captioner_config(hparams: dict) -> dict:
    """What rebuilds a captioner, as plain data: its shape, freeze policy and generation settings. Where the
    weights first came from (`lm.ckpt`, `lm.hf`, `vision.clip`) is left out: the weights file holds them all."""
    return {
        "format": FORMAT,
        "version": 1,
        "lm": {"config": dict(hparams["lm"]["config"])},
        "vision": {"clip": None, "clip_config": dict(hparams["vision"]["clip_config"])},
        "cross_every": hparams["cross_every"],
        "trainable": list(hparams["trainable"]),
        "generation": dict(hparams.get("generation") or {}),
    }


def save_captioner(model: Captioner, hparams: dict, directory: str | os.PathLike) -> None:
    """Write `model` into an existing directory as CONFIG_FILE + WEIGHTS_FILE (`load_captioner` reads it back).
    The caller makes the directory appear atomically (`captioner.models.export`)."""
    from safetensors.torch import save_model

    directory = Path(directory)
    config = captioner_config(hparams)
    try:
        text = json.dumps(config, indent=2)
    except TypeError as err:  # a hyper-parameter that is not plain data
        raise UserError(f"captioner config is not plain data ({err})") from None
    (directory / CONFIG_FILE).write_text(text + "\n")
    # save_model, not save_file: it stores the tied wte/lm_head matrix once and load_model re-ties it
    save_model(model, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})


def _load_captioner_dir(path: Path) -> tuple[Captioner, dict]:
    from safetensors.torch import load_model

    config_file, weights_file = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not config_file.is_file():
        hint = "; it looks like a transformers model (load it with GPT.from_pretrained)"
        raise UserError(
            f"{path}: no {CONFIG_FILE}, not an exported captioner{hint if (path / 'config.json').is_file() else ''}"
        )
    try:
        config = json.loads(config_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{config_file}: not valid JSON ({err})") from None
    if (
        not isinstance(config, dict)
        or config.get("format") != FORMAT
        or not all(k in config for k in CAPTIONER_KEYS)
    ):
        raise UserError(
            f"{config_file}: not a captioner config (needs format {FORMAT!r}, {', '.join(CAPTIONER_KEYS)})"
        )
    if not weights_file.is_file():
        raise UserError(f"{path}: {WEIGHTS_FILE} is missing")
    model = build_captioner(**{key: config[key] for key in CAPTIONER_KEYS})
    missing, unexpected = load_model(model, weights_file, strict=False)
    if missing or unexpected:
        raise UserError(
            f"{weights_file}: weights do not fit the config; missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return model.eval(), config
