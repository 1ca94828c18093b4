"""CLIP-I, CLIP-T and DINO on tiny CLIP / DINO models built from config (random weights, never downloaded)."""

import numpy as np
import pytest
import torch

from shared.eval.metrics import ClipEmbedder, DinoEmbedder, clip_i, clip_t, clip_t_scores, dino, mean_pairwise_cosine
from shared.eval.prompts import clip_t_text, evaluation_prompts, image_seeds, prompt_data
from shared.eval.tiny import ensure_tiny_eval_model


@pytest.fixture(scope="module")
def clip(model_cache):
    return ClipEmbedder(str(ensure_tiny_eval_model("tiny-clip")), device="cpu")


@pytest.fixture(scope="module")
def dino_model(model_cache):
    return DinoEmbedder(str(ensure_tiny_eval_model("tiny-dino")), device="cpu")


def random_images(seed: int, count: int, size: int = 48) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(count)]


def test_an_image_against_itself_scores_one(clip, dino_model):
    image = random_images(0, 1)
    assert clip_i(clip, image, image) == pytest.approx(1.0, abs=1e-5)
    assert dino(dino_model, image, image) == pytest.approx(1.0, abs=1e-5)
    # A float image in [0, 1] (a pipeline's output) is the same image as its uint8 form.
    as_float = [image[0].astype(np.float32) / 255]
    assert clip_i(clip, as_float, image) == pytest.approx(1.0, abs=1e-5)


def test_scores_are_symmetric_means_of_every_pair(clip, dino_model):
    generated, real = random_images(1, 2), random_images(2, 3)
    assert clip_i(clip, generated, real) == pytest.approx(clip_i(clip, real, generated), abs=1e-6)
    assert dino(dino_model, generated, real) == pytest.approx(dino(dino_model, real, generated), abs=1e-6)
    # The mean over all 2 x 3 pairs, each pair's cosine computed on its own.
    pairs = [clip_i(clip, [g], [r]) for g in generated for r in real]
    assert clip_i(clip, generated, real) == pytest.approx(float(np.mean(pairs)), abs=1e-6)
    assert mean_pairwise_cosine(torch.eye(2), torch.eye(2)) == pytest.approx(0.5)


def test_scores_repeat_with_fixed_seeds(model_cache, clip, dino_model):
    generated, real = random_images(3, 2), random_images(4, 2)
    again = ClipEmbedder(str(ensure_tiny_eval_model("tiny-clip")), device="cpu")
    assert clip_i(again, generated, real) == clip_i(clip, generated, real)
    assert clip_t(again, generated, "a dog") == clip_t(clip, generated, "a dog")
    assert dino(dino_model, generated, real) == dino(dino_model, generated, real)


def test_clip_t_reads_the_prompt_without_the_identifier(clip):
    assert clip_t_text("a sks dog in the jungle", "sks", "dog") == "a dog in the jungle"
    assert clip_t_text("a photo of sks", "sks", "dog") == "a photo of dog"
    assert clip_t_text("two sks dogs", "sks", "dog") == "two dogs"
    assert clip_t_text("a <new1> stuffed animal", "<new1>", "stuffed animal") == "a stuffed animal"
    assert clip_t_text("a sksx dog", "sks", "dog") == "a sksx dog"  # only the whole word
    prompts = evaluation_prompts("default", identifier="sks", class_noun="dog")
    assert prompts[0].prompt == "a sks dog in the jungle" and prompts[0].text == "a dog in the jungle"
    assert all("sks" not in p.text for p in prompts)
    # The score uses the rewritten text: the same number as scoring that text directly.
    image = random_images(5, 1)
    assert clip_t(clip, image, prompts[0].text) == pytest.approx(clip_t_scores(clip, image, ["a dog in the jungle"])[0])
    assert clip_t(clip, image, prompts[0].text) != pytest.approx(clip_t(clip, image, prompts[0].prompt), abs=1e-6)


def test_dreambooth_prompt_sets_ship_with_their_source():
    data = prompt_data()
    assert len(data["object"]) == 25 and len(data["live"]) == 25
    assert "google/dreambooth" in data["source"] and "prompts_and_classes.txt" in data["source"]
    assert len(evaluation_prompts(class_noun="dog")) == 25
    assert evaluation_prompts(class_noun="dog")[10].prompt == "a sks dog wearing a red hat"  # live set
    assert evaluation_prompts(class_noun="backpack")[10].prompt == "a sks backpack with a wheat field in the background"
    assert image_seeds(4) == [0, 1, 2, 3] and image_seeds(2, base_seed=7) == [7, 8]


def test_clip_t_agrees_with_torchmetrics_clip_score(clip):
    """torchmetrics' CLIPScore (its own processing and arithmetic: max(100 cos, 0)) on the same tiny model."""
    from torchmetrics.multimodal.clip_score import CLIPScore

    # Random weights put images and texts about 110° apart, where CLIPScore clamps to 0; flipping the image
    # projection (for both implementations) makes the cosines positive, so the comparison means something.
    with torch.no_grad():
        clip.model.visual_projection.weight.neg_()
    try:
        images = random_images(6, 3, size=32)
        texts = ["a dog in the jungle", "a red dog", "a dog wearing a santa hat"]
        ours = clip_t_scores(clip, images, texts)
        assert all(score > 0.05 for score in ours)
        for image, text, score in zip(images, texts, ours, strict=True):
            metric = CLIPScore(model_name_or_path=lambda: (_Transformers5Features(clip.model), clip.processor))
            metric.update(torch.from_numpy(image).permute(2, 0, 1), text)
            assert float(metric.compute()) == pytest.approx(100 * score, abs=1e-3)
    finally:
        with torch.no_grad():
            clip.model.visual_projection.weight.neg_()


class _Transformers5Features(torch.nn.Module):
    """torchmetrics 1.9 expects get_*_features to return tensors (transformers 4); transformers 5 returns an output
    whose pooler_output is that tensor. Only that return value is unwrapped."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.config = model.config

    def get_image_features(self, *args, **kwargs):
        return _tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs):
        return _tensor(self.model.get_text_features(*args, **kwargs))


def _tensor(output):
    return output if isinstance(output, torch.Tensor) else output.pooler_output
