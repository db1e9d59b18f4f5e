"""Settings of the reference recommenders, one home for every default (torch-free)."""

from __future__ import annotations

import argparse

from pydantic import BaseModel, ConfigDict, Field

REFERENCE_METHODS: tuple[str, ...] = ("transition", "sasrec")


class TransitionConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    recent: int = Field(5, ge=1)  # history items that vote, most recent first
    decay: float = Field(0.6, gt=0)  # the j-th most recent votes with weight decay**j (j = 0, 1, ...)
    max_gap: int = Field(3, ge=1)  # a follower g steps later counts 1/g, for g = 1..max_gap


class SASRecConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dim: int = Field(64, ge=1)  # embedding and hidden size
    blocks: int = Field(2, ge=1)  # self-attention blocks
    heads: int = Field(1, ge=1)  # attention heads (dim must be a multiple)
    dropout: float = Field(0.5, ge=0, lt=1)  # the paper's rate for the sparse Beauty data
    max_len: int = Field(20, ge=1)  # items seen per sequence: the prompts' history length
    epochs: int = Field(40, ge=1)  # at most; validation stops earlier
    batch_size: int = Field(128, ge=1)
    lr: float = Field(3e-3, gt=0)
    negatives: int = Field(1024, ge=1)  # sampled softmax negatives (full softmax if the catalogue is smaller)
    val_rows: int = Field(2000, ge=0)  # valid rows for model selection (0: keep the last epoch)
    patience: int = Field(4, ge=1)  # epochs without a better valid NDCG@10 before stopping
    seed: int = 0
    threads: int = Field(1, ge=1)  # torch threads while training and ranking


class ReferenceConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    methods: list[str] = list(REFERENCE_METHODS)
    # True: never recommend an item of the prompt's history (the references' ranking rule);
    # False: history items may be recommended, as the generative target's beam search may
    skip_history: bool = True
    transition: TransitionConfig = TransitionConfig()
    sasrec: SASRecConfig = SASRecConfig()


def _methods(text: str) -> list[str]:
    names = [m for m in text.split(",") if m and m != "none"]
    bad = [m for m in names if m not in REFERENCE_METHODS]
    if bad:
        raise argparse.ArgumentTypeError(
            f"unknown reference method {bad[0]!r}; choose from {', '.join(REFERENCE_METHODS)} or none")
    return names


def add_reference_args(p: argparse.ArgumentParser) -> None:
    """``--references``, ``--references-keep-history``, ``--sasrec-epochs`` (defaults above)."""
    d = ReferenceConfig()
    g = p.add_argument_group("reference recommenders (reported beside popularity; not the product)")
    g.add_argument("--references", type=_methods, default=d.methods,
                   help=f"comma list of {', '.join(REFERENCE_METHODS)}, or none "
                        f"(default: {','.join(d.methods)})")
    g.add_argument("--references-keep-history", action="store_true",
                   help="let the references recommend history items (default: they skip them)")
    g.add_argument("--sasrec-epochs", type=int, default=d.sasrec.epochs,
                   help=f"most SASRec training epochs (default: {d.sasrec.epochs})")


def reference_config(args: argparse.Namespace) -> ReferenceConfig:
    """The settings from the flags of ``add_reference_args`` (and ``--seed`` for SASRec)."""
    return ReferenceConfig(methods=args.references, skip_history=not args.references_keep_history,
                           sasrec=SASRecConfig(epochs=args.sasrec_epochs, seed=args.seed))
