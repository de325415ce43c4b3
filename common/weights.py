"""Loading network weights from files and run locations, for every job: the SimCLR encoder, a classifier's
backbone, a whole train-classifier model, an ``--init`` file (the value checks that refuse weights no trained
network holds are ``common.checkpoints.check_weight_values``).

Below the trainers and the inference paths: pretrain-simclr, train-classifier, evaluate-pairs and identify all
import this module, and it imports none of them (only the architectures of ``common.models``, the weights_only
loader and checks of ``common.checkpoints`` and the storage layer).
"""

from __future__ import annotations

import torch
from torch import nn

from facessl.common.checkpoints import check_weight_values, load_error_summary, load_torch
from facessl.common.config import ClassifierConfig, is_crop_side
from facessl.common.errors import BadInputError
from facessl.common.models import CLASSIFIER_HEADS, Classifier, build_encoder
from facessl.common.storage import NotFoundError, join_location, open_storage


def load_encoder_weights(encoder: nn.Module, state, where: str) -> None:
    """Load backbone weights (see :func:`encoder_state_from_file`) into ``encoder``.

    Raises:
        ValueError: not ResNet18 backbone weights (wrong keys, shapes or value types).
    """
    try:
        encoder.load_state_dict(encoder_state_from_file(state, where))
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise ValueError(f"{where} does not fit a ResNet18 backbone: {load_error_summary(exc)}") from None


def encoder_state_from_file(state: dict, where: str) -> dict:
    """Backbone weights from a loaded state dict: a facessl ``encoder.pt``, a classifier ``model.pt``
    (``encoder.`` prefix) or torchvision's ImageNet ``resnet18`` file (``fc.*`` dropped).

    Raises:
        ValueError: the dict does not hold ResNet18 backbone weights, or values no network holds
        (:func:`check_weight_values`).
    """
    if not isinstance(state, dict):
        raise ValueError(f"{where} does not hold a state dict")
    for wrapper in ("model", "encoder"):
        if isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if any(k.startswith("encoder.") for k in state):
        state = {k[len("encoder.") :]: v for k, v in state.items() if k.startswith("encoder.")}
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    expected = set(build_encoder().state_dict())
    if set(state) != expected:
        missing = sorted(expected - set(state))[:3]
        extra = sorted(set(state) - expected)[:3]
        raise ValueError(f"{where} is not a ResNet18 backbone (missing {missing}, unexpected {extra})")
    check_weight_values(state, where)
    return state


def load_init_encoder(init: str) -> torch.nn.Module:
    """A ResNet18 encoder, random (``scratch``) or with the weights of the file at ``init``."""
    encoder = build_encoder()
    if init != "scratch":
        try:
            load_encoder_weights(encoder, load_torch(init), init)
        except ValueError as exc:
            raise BadInputError(str(exc)) from None
    return encoder


def load_encoder(location: str, run_location: bool = True) -> tuple[torch.nn.Module, str]:
    """A ResNet18 backbone from a weights file (``encoder.pt``, a classifier ``model.pt``, torchvision's
    ImageNet file) or, with ``run_location``, a pretrain-simclr run location holding ``encoder.pt``; returns
    it and the file it came from. A train-classifier run location (``model.pt``, no ``encoder.pt``) gives its
    fine-tuned backbone.

    Raises:
        BadInputError: not ResNet18 backbone weights, or a run location holding neither file.
    """
    encoder = build_encoder()
    if run_location and is_run_location(location):
        run = open_storage(location)
        name = next((n for n in ("encoder.pt", "model.pt") if run.exists(n)), None)
        if name is None:
            raise BadInputError(
                f"{location} holds neither encoder.pt (a pretrain-simclr run) nor model.pt (a train-classifier run)"
            )
        location = join_location(location, name)
    try:
        load_encoder_weights(encoder, load_torch(location), location)
    except ValueError as exc:
        raise BadInputError(str(exc)) from None
    return encoder, location


def is_run_location(location: str) -> bool:
    """A folder / prefix holding ``encoder.pt`` rather than a weights file itself."""
    import os

    if location.startswith("s3://"):
        return not location.rstrip("/").endswith((".pt", ".pth"))
    return os.path.isdir(location)


def load_classifier(location: str) -> tuple[Classifier, list[str], int]:
    """A train-classifier ``model.pt`` (file or run location): the model in eval mode (a linear or cosine
    classification layer, as saved), its class names and the image size it was trained at.

    Raises:
        BadInputError: not a train-classifier model file, or weights no network holds (NaN, inf...).
    """
    if not location.rstrip("/").endswith((".pt", ".pth")):
        location = location.rstrip("/") + "/model.pt"
    try:
        saved = load_torch(location)
    except NotFoundError:
        raise BadInputError(
            f"{location} not found: this needs a finetune, linear-probe or distill run of "
            "train-classifier (a --mode knn run writes no model)"
        ) from None
    if not (
        isinstance(saved, dict) and isinstance(saved.get("model"), dict) and isinstance(saved.get("classes"), list)
    ):
        raise BadInputError(f"{location} is not a train-classifier model.pt (model, classes, image_size)")
    classes = saved["classes"]
    if not all(isinstance(c, str) and c for c in classes) or len(set(classes)) != len(classes):
        raise BadInputError(
            f"{location} has class names that are not distinct non-empty strings: a "
            "train-classifier model.pt names each identity once"
        )
    if len(classes) < 2:
        raise BadInputError(
            f"{location} names {len(classes)} identities: a train-classifier model.pt names two or more"
        )
    # files from before the cosine layer carry neither key; a linear layer has no scale
    head = saved.get("head", "linear")
    # the bounds and default of train-classifier's --scale, declared once in common.config
    bounds = ClassifierConfig.__dataclass_fields__["scale"].metadata
    low, high, default = bounds["min"], bounds["max"], ClassifierConfig.scale
    scale = saved.get("scale", default) if head == "cosine" else default
    if (
        head not in CLASSIFIER_HEADS
        or isinstance(scale, bool)
        or not isinstance(scale, (int, float))
        or not low <= scale <= high
    ):
        raise BadInputError(
            f"{location} has head {head!r}, scale {scale!r}: a train-classifier model.pt holds a linear or a cosine "
            f"layer, the cosine one with a scale of {low:g} to {high:g}"
        )
    model = Classifier(build_encoder(), len(saved["classes"]), head=head, scale=scale)
    try:
        check_weight_values(saved["model"], location)
        model.load_state_dict(saved["model"])
    except ValueError as exc:
        raise BadInputError(str(exc)) from None
    except (RuntimeError, TypeError) as exc:
        raise BadInputError(f"{location} does not fit a ResNet18 classifier: {load_error_summary(exc)}") from None
    size = saved.get("image_size", 112)
    if not is_crop_side(size):
        raise BadInputError(f"{location} has image_size {size!r}: a train-classifier model.pt holds 16 to 4096 px")
    return model.eval(), list(classes), size
