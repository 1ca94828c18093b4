"""DreamBooth fine-tuning of DiffuseKronA factors (SD 1.x/2.x and SDXL), with exact resume.

The parts (`load_components`, `prepare_data`, `build_adapter`, `train_step`, `save_checkpoint`,
`save_trained_adapter`) are callable on their own; `train` runs them with progress, cancellation,
checkpoints and validation images. `check_factors_fit_base_model` validates a job against the base
model's UNet config (no weights) before anything heavy starts.

    components.py    load_components, encode_prompt: the frozen pipeline on the device
    data.py          prepare_data: images and prompts encoded once
    adapter.py       build_adapter, save_trained_adapter: the factors that train
    step.py          TrainState, train_step, denoising_loss: one optimizer step
    checkpoints.py   save_checkpoint, find_latest_checkpoint, load_checkpoint: exact resume
    class_images.py  generate_class_images: prior preservation
    validation.py    render_validation_images
    preflight.py     check_factors_fit_base_model
    trainer.py       train: the loop
"""

from shared.images import ImageLimits, SubjectImage, decode_image, list_image_files, load_subject_images
from shared.training_spec import TrainingSpec

from .adapter import build_adapter, save_trained_adapter
from .checkpoints import find_latest_checkpoint, load_checkpoint, save_checkpoint
from .class_images import generate_class_images
from .components import Components, encode_prompt, load_components, native_resolution
from .data import PreparedData, prepare_data, to_training_tensor
from .preflight import check_factors_fit_base_model
from .step import TrainState, denoising_loss, train_step
from .trainer import Progress, TrainingCanceled, TrainingResult, train
from .validation import render_validation_images

__all__ = [
    "Components",
    "ImageLimits",
    "PreparedData",
    "Progress",
    "SubjectImage",
    "TrainState",
    "TrainingCanceled",
    "TrainingResult",
    "TrainingSpec",
    "build_adapter",
    "check_factors_fit_base_model",
    "decode_image",
    "denoising_loss",
    "encode_prompt",
    "find_latest_checkpoint",
    "generate_class_images",
    "list_image_files",
    "load_checkpoint",
    "load_components",
    "load_subject_images",
    "native_resolution",
    "prepare_data",
    "render_validation_images",
    "save_checkpoint",
    "save_trained_adapter",
    "to_training_tensor",
    "train",
    "train_step",
]
