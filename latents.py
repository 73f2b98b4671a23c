"""What "the latent of a frame" is, for the next-frame latent objective: three targets and the
autoencoders behind two of them.

- `pixels`: the frame itself, area-downsampled to `size` x `size` and scaled to [-1, 1]
  (`pixel_target`). No weights; computed on the fly from the frames the model sees.
- `vae`: Stable Diffusion's KL autoencoder (diffusers `AutoencoderKL`, default
  `stabilityai/sd-vae-ft-mse`): the mean of the posterior times the model's `scaling_factor`
  (0.18215), [4, size/8, size/8]. Precomputed into shards (scripts/precompute_latents.py).
- `taesd`: the tiny distilled autoencoder (diffusers `AutoencoderTiny`, default `madebyollin/taesd`).
  It maps straight into the same scaled latent space as the SD VAE (its `scaling_factor` is 1.0),
  [4, size/8, size/8], at a fraction of the cost.

Before encoding, frames are resized to `size` with `media.resize` in the training resize mode
(squash / crop / pad), so a latent shows the same view of the frame as the model's input.

diffusers is optional: only precomputing and decoding need it, and it is imported where used.
"""

import contextlib
import json
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from media import resize

TARGETS = ("pixels", "vae", "taesd")
AUTOENCODER_CLASSES = {"vae": "AutoencoderKL", "taesd": "AutoencoderTiny"}
DEFAULT_MODELS = {"vae": "stabilityai/sd-vae-ft-mse", "taesd": "madebyollin/taesd"}
DIFFUSERS_REQUIREMENT = "diffusers>=0.42,<0.43"


class LatentModelError(RuntimeError):
    """An autoencoder that cannot be loaded (offline, not cached, wrong kind of checkpoint)."""


def pixel_target(frames: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [N, 3, H, W] -> float32 [N, 3, size, size] in [-1, 1]: each output pixel is the mean of
    the input pixels it covers (area downsampling), on the frames' device."""
    if frames.dtype != torch.uint8 or frames.dim() != 4 or frames.shape[1] != 3:
        raise ValueError(f"pixel_target needs uint8 frames [N, 3, H, W], got {frames.dtype} {tuple(frames.shape)}")
    if size < 1:
        raise ValueError(f"pixel target size must be >= 1, got {size}")
    # adaptive average pooling is area interpolation: exact block means when size divides H and W
    return F.adaptive_avg_pool2d(frames.float(), size) / 127.5 - 1


def _diffusers():
    try:
        import diffusers
    except ImportError as e:
        raise ImportError(f"the latent targets 'vae' and 'taesd' need diffusers: pip install '{DIFFUSERS_REQUIREMENT}' "
                          "(only precomputing latents and decoding them need it; training reads precomputed "
                          "latents from the shards)") from e
    return diffusers


def _looks_local(name: str) -> bool:
    """A folder path rather than a hub id ('owner/name'): it exists, or it could not be a hub id."""
    return Path(name).expanduser().exists() or name.startswith(("/", ".", "~")) or name.count("/") > 1


@contextlib.contextmanager
def _quiet_diffusers():
    """diffusers logs noise on every load (e.g. AutoencoderTiny's own `block_out_channels` config entry
    'will be ignored'), and huggingface_hub warns about an argument diffusers passes; weight mismatches,
    the one thing worth reporting, `load_autoencoder` checks itself."""
    logging = _diffusers().utils.logging
    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The `local_dir_use_symlinks` argument is deprecated")
            yield
    finally:
        logging.set_verbosity(level)


def load_autoencoder(name: str, kind: str, device="cpu", dtype: torch.dtype = torch.float32,
                     setting: str = "model"):
    """The `kind` ('vae' or 'taesd') autoencoder from a local folder or a hub id, in eval mode on
    `device` with weights in `dtype` (encode/decode add bf16 autocast on CUDA). A hub id is looked up
    in the local cache first (no network), then downloaded. `setting` names the option the name came
    from, for the error raised when it cannot be loaded."""
    if kind not in AUTOENCODER_CLASSES:
        raise ValueError(f"{setting}: autoencoder kind must be one of {tuple(AUTOENCODER_CLASSES)}, got {kind!r}")
    cls = getattr(_diffusers(), AUTOENCODER_CLASSES[kind])
    local = _looks_local(name)
    path = str(Path(name).expanduser()) if local else name
    if local:
        _check_folder(Path(path), name, kind, cls.__name__, setting)
    attempts = [dict()] if local else [dict(local_files_only=True), dict()]  # the cache first, then the hub
    errors = []
    with _quiet_diffusers():
        for extra in attempts:
            try:
                model, info = cls.from_pretrained(path, torch_dtype=dtype, output_loading_info=True, **extra)
                break
            except (OSError, ValueError) as e:  # OSError: not found / no network; ValueError: not a valid id
                errors.append(f"{type(e).__name__}: {(str(e).splitlines() or [''])[0].rstrip('.')}")
        else:
            if local:
                raise LatentModelError(f"{setting}={name!r}: cannot load the {cls.__name__} in that folder "
                                       f"({errors[-1]})")
            raise LatentModelError(_unloadable_message(name, kind, cls.__name__, setting, errors[-1]))
    missing = info.get("missing_keys") or []
    if missing:  # e.g. an AutoencoderKL folder loaded as AutoencoderTiny: diffusers fills in random weights
        raise LatentModelError(f"{setting}={name!r} does not hold {cls.__name__} weights for target {kind!r} "
                               f"({len(missing)} weights missing, e.g. {missing[0]}); is it the other kind of "
                               f"autoencoder ({', '.join(f'{k}: {c}' for k, c in AUTOENCODER_CLASSES.items())})?")
    return model.to(device).eval().requires_grad_(False)


def _check_folder(path: Path, name, kind, cls_name, setting):
    """A local model folder holds a diffusers config of the expected class (diffusers itself would
    load another autoencoder's folder with random weights, or fail on a config mismatch)."""
    if not path.is_dir():
        raise LatentModelError(f"{setting}={name!r}: no such folder (give a local {cls_name} folder, as "
                               "save_pretrained writes it, or a Hugging Face hub id)")
    config = path / "config.json"
    if not config.is_file():
        raise LatentModelError(f"{setting}={name!r}: the folder has no config.json (expected a diffusers "
                               f"{cls_name} folder, as save_pretrained writes it)")
    try:
        found = json.loads(config.read_text()).get("_class_name")
    except (ValueError, AttributeError) as e:
        raise LatentModelError(f"{setting}={name!r}: {config} is not a JSON object ({e})") from e
    if found and found != cls_name:
        kinds = ", ".join(f"{k}: {c}" for k, c in AUTOENCODER_CLASSES.items())
        raise LatentModelError(f"{setting}={name!r} holds an {found}, but target {kind!r} needs an {cls_name} "
                               f"({kinds})")


def _unloadable_message(name, kind, cls_name, setting, error) -> str:
    where = "the Hugging Face cache or hub (offline, or not cached?)"
    return (f"{setting}={name!r}: cannot load the {kind!r} autoencoder ({cls_name}) from {where}: {error}. "
            "To proceed: precompute the latents on a machine with network access "
            f"(python scripts/precompute_latents.py --target {kind} --model {name} ...) and train on those "
            f"shards, or download the model there (huggingface-cli download {name} --local-dir DIR), copy DIR "
            f"here and pass it as {setting}=DIR.")


def _scale_shift(ae) -> tuple[float, float]:
    """(scaling_factor, shift_factor) of a diffusers autoencoder's config: latents are
    (z - shift) * scale, as diffusers pipelines feed them to their diffusion models."""
    config = ae.config
    return float(config.get("scaling_factor") or 1.0), float(config.get("shift_factor") or 0.0)


def _autocast(device: torch.device):
    # bf16 on CUDA: the SD VAE overflows in fp16 at some inputs; bf16 has fp32's range. autocast keeps
    # the group norms in fp32. CPU runs in the weights' dtype (fp32 by default).
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _weights(ae) -> torch.Tensor:
    return next(ae.parameters())


@torch.no_grad()
def encode(ae, frames: torch.Tensor, size: int, resize_mode: str = "squash", pad_fill=None,
           batch_size: int = 16) -> torch.Tensor:
    """uint8 frames [N, 3, H, W] -> float32 latents [N, C, h, w] on the CPU (for the SD VAE and TAESD:
    C = 4, h = w = size / 8). Frames are resized to `size` on the CPU with `media.resize` (`resize_mode`,
    `pad_fill` as in training), scaled to [-1, 1] and encoded `batch_size` at a time; a KL autoencoder
    gives its posterior mean."""
    if frames.dtype != torch.uint8 or frames.dim() != 4 or frames.shape[1] != 3 or not len(frames):
        raise ValueError(f"encode needs uint8 frames [N >= 1, 3, H, W], got {frames.dtype} {tuple(frames.shape)}")
    weights = _weights(ae)
    scale, shift = _scale_shift(ae)
    pixels = resize(frames.cpu(), size, resize_mode, pad_fill)
    out = []
    for chunk in pixels.split(max(1, batch_size)):
        x = (chunk.to(weights.device, torch.float32) / 127.5 - 1).to(weights.dtype)
        with _autocast(weights.device):
            encoded = ae.encode(x)
        # AutoencoderKL returns a distribution (latent_dist), AutoencoderTiny the latents themselves
        z = encoded.latent_dist.mean if hasattr(encoded, "latent_dist") else encoded.latents
        out.append(((z.float() - shift) * scale).cpu())
    return torch.cat(out)


@torch.no_grad()
def decode(ae, latents: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """Latents [N, C, h, w] (as `encode` gives them, any float dtype or device) -> uint8 images
    [N, 3, H, W] on the CPU, `batch_size` at a time."""
    if latents.dim() != 4 or not len(latents):
        raise ValueError(f"decode needs latents [N >= 1, C, h, w], got {tuple(latents.shape)}")
    weights = _weights(ae)
    scale, shift = _scale_shift(ae)
    out = []
    for chunk in latents.split(max(1, batch_size)):
        z = (chunk.to(weights.device, torch.float32) / scale + shift).to(weights.dtype)
        with _autocast(weights.device):
            images = ae.decode(z).sample  # [-1, 1] for both kinds
        out.append(((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu())
    return torch.cat(out)
