"""Building an index and adding to it, as Python calls: :func:`build_index` and :func:`add_to_index` are what
``e5v index build`` and ``e5v index add`` run; :func:`index_config` is the engine configuration that extends,
repairs or queries an existing index (the options not given are the index's, so that its vectors stay in one
space).

::

    from e5v.store import build_index, add_to_index
    summary = build_index("photos/", "photos.idx", model="royokong/e5-v", precision="float16")
    summary = build_index("photos/", "small.idx", model="royokong/e5-v", precision="binary", dims=1024)
    summary = add_to_index("photos.idx", "more-photos/")      # the index's model, prompts and precision
"""
from __future__ import annotations

import dataclasses
import os

from .. import prompts
from ..config import EngineConfig
from ..errors import ConfigError, InputError
from ..vectors import PRECISIONS as CODE_PRECISIONS
from .ann import build_ann
from .build import Ranks, Summary, index_root, run_job
from .codes import update_codes
from .layout import PRECISIONS, read_index_manifest
from .sources import Entry, read_source

#: the engine options that change the vectors and that a caller may leave at their defaults (then the index's are
#: used);
#: not the compute dtype, whose ``auto`` resolves on the machine that runs
INDEX_OPTIONS = tuple(f.name for f in dataclasses.fields(EngineConfig)
                      if f.metadata.get("vectors") and f.name != "dtype")


def index_config(manifest: dict, given: EngineConfig | None = None) -> EngineConfig:
    """``given`` (default: the defaults) with the vector options it leaves at their defaults taken from the index:
    its model, adapter, chat format, max length, AnyRes tiles and alpha, so that new vectors are made as the stored
    ones were (an index written before a setting was recorded keeps the default). The compute dtype stays
    ``given``'s (``auto``: this machine's choice); one other than the index's recorded dtype is warned about, not
    refused (see :func:`e5v.store.build.check_settings`)."""
    given, defaults = given or EngineConfig(), EngineConfig()
    return given.replace(**{k: manifest[k] for k in INDEX_OPTIONS
                            if k in manifest and getattr(given, k) == getattr(defaults, k)})


def index_settings(manifest: dict, config: EngineConfig) -> dict:
    """The settings of vectors that ``config`` makes for the index of ``manifest`` (its prompts and precision),
    as :func:`e5v.store.build.check_settings` compares them with the index's."""
    return {**config.vector_settings(), "prompt": manifest["prompt"], "precision": manifest["precision"]}


def read_entries(source: str, *, rebase: bool = False, root: str | None = None) -> list[Entry]:
    """The items of ``source`` (see :func:`e5v.store.sources.read_source`); none at all is an error."""
    entries = read_source(source, rebase=rebase, root=root)
    if not entries:
        raise InputError(source, "no items to index")
    return entries


def build_index(source, out, *, model: str | None = None, config: EngineConfig | None = None,
                precision: str = "float32", dims: int | None = None, task: str | None = None,
                image_prompt: str | None = None, text_prompt: str | None = None, part_size: int = 1024,
                ann: dict | None = None, progress: bool = True) -> Summary:
    """Embed ``source`` into a new index folder ``out``; rerun after an interruption to resume. Under
    ``torchrun`` every rank calls it alike and embeds its share.

    ``source``: a folder of images (recursive), a glob, a .jsonl/.csv/.parquet manifest, or WebDataset .tar
    shards. ``model`` or ``config`` (an :class:`~e5v.config.EngineConfig`; ``model`` overrides its model): the
    engine, loaded only when there is something to embed. ``precision``: the stored vectors, float32 or float16;
    int8 or binary: search codes in that precision over vectors stored in float16, which re-score the top
    candidates. ``dims``: the search codes hold that many dimensions, by a PCA fitted on a sample of the index
    and applied to every query (see :mod:`e5v.store.codes`); as many as the vectors have or more: no PCA, and
    with float32 or float16 no search codes at all (they would copy the stored vectors). Images get the gallery
    prompt of ``task`` (cirr, fashioniq-*) or ``image_prompt``; texts ``text_prompt`` (default: E5-V's). ``ann``:
    build the approximate index when done, with these :func:`~e5v.store.ann.build_ann` options (``{}``: its
    defaults).
    Returns the :class:`~e5v.store.build.Summary` of the job; ``finished_before`` when ``out`` already holds it."""
    config = config or EngineConfig()
    config = config.replace(model=model) if model is not None else config
    if not config.model:
        raise ConfigError("build_index needs a model (model=... or config=EngineConfig(model=...))")
    if precision not in CODE_PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(CODE_PRECISIONS)}, not {precision!r}")
    codes = {"precision": precision, "dims": dims} if precision not in PRECISIONS or dims is not None else None
    if codes and ann is not None:
        raise ConfigError("an index searches either its search codes (int8, binary, --dims) or an approximate "
                          "index (--ann), not both")
    prompt = {"image": image_prompt or prompts.image_prompt(task), "text": text_prompt or prompts.TEXT}
    source = os.fsdecode(source)
    stored = precision if precision in PRECISIONS else "float16"  # the copy that re-scores the codes' candidates
    settings = {**config.vector_settings(), "prompt": prompt, "precision": stored}
    return _run(out, source, config, settings, add=False, root=os.path.abspath(source) if os.path.isdir(source)
                else None, part_size=part_size, progress=progress, ann=ann, codes=codes)


def add_to_index(index, source, *, config: EngineConfig | None = None, update: bool = False, part_size: int = 1024,
                 progress: bool = True) -> Summary:
    """Embed the items of ``source`` that the index at ``index`` does not hold yet, with its model, prompts and
    precision (``config``: engine options; the vector options it leaves open are the index's, see
    :func:`index_config`; one that differs from the index's is refused, a compute dtype or checkpoint files other
    than the recorded ones are warned about). ``update``: re-embed the items whose file
    or text changed since they were indexed. Resumable like :func:`build_index`; extends the approximate index if
    there is one."""
    manifest = read_index_manifest(index)
    if manifest is None:
        raise ConfigError(f"{index}: no index there (no manifest.json); create one with `e5v index build`")
    config = index_config(manifest, config)
    return _run(index, os.fsdecode(source), config, index_settings(manifest, config), add=True,
                root=index_root(manifest), part_size=part_size, progress=progress, update=update)


def _run(folder, source: str, config: EngineConfig, settings: dict, *, add: bool, root: str | None,
         part_size: int, progress: bool, update: bool = False, ann: dict | None = None,
         codes: dict | None = None) -> Summary:
    """One job on every rank (``root``: the folder a new index is built from, or that an add's image ids are
    relative to); rank 0 then builds or extends the approximate index or the search codes."""
    from ..encoder import load_engine  # here: importing e5v.store loads no torch (index info, verify, export)

    ranks = Ranks()
    ranks.start()
    try:
        config = config.replace(device=ranks.device(config.device))
        entries = read_entries(source, rebase=add, root=root)
        summary = run_job(folder, entries, settings, add=add, part_size=part_size,
                          source=os.path.abspath(source),  # recorded: `index repair` reads it again from anywhere
                          load_model=lambda: load_engine(config, progress), progress=progress, ranks=ranks,
                          root=None if add else root, update=update)
        if ranks.rank == 0 and summary.manifest["count"]:
            summary.codes = _codes(folder, summary.manifest, codes)
        if ranks.rank == 0 and not summary.finished_before and summary.manifest["count"]:
            if add and summary.manifest.get("ann"):
                summary.ann = build_ann(folder, update=True)
            elif not add and ann is not None:
                summary.ann = build_ann(folder, **ann)
        ranks.barrier()  # the ranks leave the process group together (an early leaver can abort a peer's gloo)
        return summary
    finally:
        ranks.stop()


def _codes(folder, manifest: dict, asked: dict | None) -> dict | None:
    """The search codes after a job: fitted and encoded as ``asked`` (a build, also one finished before: codes
    asked of an index without them), else the index's own brought up to date."""
    have = manifest.get("codes")
    if asked and asked["dims"] is not None and asked["dims"] >= manifest["dim"]:
        asked = {**asked, "dims": None}  # as many dimensions as the vectors have: no PCA
    if asked and asked["precision"] in PRECISIONS and asked["dims"] is None:
        asked = None  # float codes of the full width would be a second copy of the stored vectors: none
    if asked and not (have and have["precision"] == asked["precision"] and have.get("dims") == asked["dims"]):
        return update_codes(folder, **asked)
    return update_codes(folder) if have else None

