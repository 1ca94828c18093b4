"""Subject fidelity and prompt fidelity of generated images: CLIP-I, CLIP-T and DINO, as DreamBooth defines them.

- CLIP-I: mean cosine similarity of CLIP image embeddings, every generated image against every real image.
- CLIP-T: mean cosine similarity of each generated image's CLIP embedding and the CLIP text embedding of its
  prompt, read with the identifier removed (`shared.eval.prompts.clip_t_text`).
- DINO: mean cosine similarity of DINO ViT-S/16 CLS embeddings, generated against real (unlike CLIP, DINO is
  not trained to ignore what tells two members of a class apart, so it rewards the subject's own features).

Scores are cosines in [-1, 1] (DreamBooth's tables: real images score CLIP-I 0.885, DINO 0.774 against each
other). Models load through transformers' `from_pretrained`, by hub id or local folder. Needs torch; the
gateway never imports this package.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from shared.images import to_uint8

DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"
DEFAULT_DINO_MODEL = "facebook/dino-vits16"


def to_pil(image: Any) -> Any:
    """A PIL RGB image from a PIL image, a uint8 array (H, W, 3) or a float array in [0, 1] (a pipeline's
    `output_type="np"`)."""
    # lazy: loads PIL
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = np.asarray(image)
    if array.dtype != np.uint8:
        array = to_uint8(array.astype(np.float32))
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"an image must be (H, W, 3); got shape {array.shape}")
    return Image.fromarray(array)


def _device(device: str | torch.device | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _normalized(features: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(features.float(), dim=-1)


def _as_embeddings(output: Any) -> torch.Tensor:
    # transformers 4 returns the projected tensor; transformers 5 a model output whose pooler_output holds it.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class ClipEmbedder:
    """A CLIP model and its processor: unit-length image and text embeddings, (N, projection_dim)."""

    def __init__(self, model: str = DEFAULT_CLIP_MODEL, *, device: str | torch.device | None = None) -> None:
        # lazy: loads torch, transformers, PIL, …
        from transformers import CLIPModel, CLIPProcessor

        self.name = str(model)
        self.device = _device(device)
        self.model = CLIPModel.from_pretrained(model).eval().to(self.device)
        self.processor = CLIPProcessor.from_pretrained(model)

    @torch.no_grad()
    def image_embeddings(self, images: Sequence[Any]) -> torch.Tensor:
        """(N, D) unit vectors of N images (PIL, uint8 or float arrays)."""
        pixels = self.processor(images=[to_pil(i) for i in images], return_tensors="pt")["pixel_values"]
        return _normalized(_as_embeddings(self.model.get_image_features(pixel_values=pixels.to(self.device))))

    @torch.no_grad()
    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, D) unit vectors of N texts (truncated at CLIP's 77 tokens)."""
        tokens = self.processor(text=list(texts), return_tensors="pt", padding=True, truncation=True)
        features = self.model.get_text_features(
            input_ids=tokens["input_ids"].to(self.device), attention_mask=tokens["attention_mask"].to(self.device)
        )
        return _normalized(_as_embeddings(features))


class DinoEmbedder:
    """A DINO ViT (ViTModel) and its image processor: unit-length CLS embeddings, (N, hidden_size)."""

    def __init__(self, model: str = DEFAULT_DINO_MODEL, *, device: str | torch.device | None = None) -> None:
        # lazy: loads torch, transformers, PIL, …
        from transformers import AutoImageProcessor, ViTModel

        self.name = str(model)
        self.device = _device(device)
        # DINO checkpoints have no pooler: the CLS token of the last (layer-normed) hidden state is the embedding.
        vit = ViTModel.from_pretrained(model, add_pooling_layer=False)
        self.model = vit.eval().to(self.device)
        self.processor = AutoImageProcessor.from_pretrained(model)

    @torch.no_grad()
    def image_embeddings(self, images: Sequence[Any]) -> torch.Tensor:
        """(N, D) unit vectors of N images (PIL, uint8 or float arrays)."""
        pixels = self.processor(images=[to_pil(i) for i in images], return_tensors="pt")["pixel_values"]
        hidden = self.model(pixel_values=pixels.to(self.device)).last_hidden_state  # (N, tokens, D)
        return _normalized(hidden[:, 0])


def mean_pairwise_cosine(first: torch.Tensor, second: torch.Tensor) -> float:
    """Mean cosine of every row of `first` (N, D) with every row of `second` (M, D); both unit length."""
    if len(first) == 0 or len(second) == 0:
        raise ValueError("no images to compare")
    return float((first @ second.T).mean())


def clip_i(clip: ClipEmbedder, generated: Sequence[Any], real: Sequence[Any]) -> float:
    """CLIP-I: mean CLIP image-embedding cosine of every generated image against every real image."""
    return mean_pairwise_cosine(clip.image_embeddings(generated), clip.image_embeddings(real))


def dino(dino_model: DinoEmbedder, generated: Sequence[Any], real: Sequence[Any]) -> float:
    """DINO: mean DINO CLS-embedding cosine of every generated image against every real image."""
    return mean_pairwise_cosine(dino_model.image_embeddings(generated), dino_model.image_embeddings(real))


def clip_t_scores(clip: ClipEmbedder, images: Sequence[Any], texts: Sequence[str]) -> list[float]:
    """The CLIP image-text cosine of each image with its own text (image i with text i)."""
    if len(images) != len(texts):
        raise ValueError(f"{len(images)} images but {len(texts)} texts; give one text per image")
    if not images:
        raise ValueError("no images to compare")
    pairs = (clip.image_embeddings(images) * clip.text_embeddings(texts)).sum(dim=-1)
    return [float(value) for value in pairs]


def clip_t(clip: ClipEmbedder, images: Sequence[Any], text: str) -> float:
    """CLIP-T: mean CLIP cosine of the images with one text (the prompt as `clip_t_text` rewrites it)."""
    return float(np.mean(clip_t_scores(clip, images, [text] * len(images))))
