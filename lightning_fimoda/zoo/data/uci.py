"""The paper's tabular datasets from local files: Concrete, Energy Efficiency, FICO HELOC, UCI Adult,
and Folktables ACSIncome through the ``folktables`` package.

Each datamodule reads one CSV file: ``path`` if given, else ``data_dir / <default file name>``.
Preprocessing follows the paper (see :class:`~lightning_fimoda.zoo.data.base.TabularDataModule`); the
dataset-specific steps are documented on each class.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ...exceptions import MissingExtraError
from .base import TabularDataModule, numeric_columns, read_table, require_columns, require_file

__all__ = [
    "AdultDataModule",
    "ConcreteDataModule",
    "EnergyDataModule",
    "FolktablesDataModule",
    "HELOCDataModule",
    "encode_acs_income",
    "one_hot",
]


class CSVDataModule(TabularDataModule):
    """A :class:`TabularDataModule` read from one CSV file.

    Args:
        data_dir: folder holding :attr:`filename` (used when ``path`` is not given).
        path: the CSV file itself.
        **kwargs: see :class:`~lightning_fimoda.zoo.data.base.TabularDataModule`.
    """

    filename = ""
    source = ""  # where to get the file, for error messages

    def __init__(self, data_dir: str | Path = "data", path: str | Path | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.data_dir = Path(data_dir)
        self.path = Path(path) if path is not None else self.data_dir / self.filename

    def read(self) -> tuple[list[str], list[list[str]]]:
        path = require_file(
            self.path, self.name,
            f"Download it from {self.source} and pass its location as path=... (or its folder as "
            f"data_dir=..., file name {self.filename!r}).",
        )
        return read_table(path)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(path={str(self.path)!r})"


class ConcreteDataModule(CSVDataModule):
    """UCI Concrete Compressive Strength (1030 x 8 -> 927 train / 103 test), regression.

    Columns: ``Cement, Blast_Furnace_Slag, FlyAsh, Water, Superplasticizer, Coarse_Aggregate,
    Fine_Aggregate, Age`` and the target ``strength`` (MPa); features and target standardised.
    """

    task_kind = "regression"
    name = "Concrete"
    filename = "concrete.csv"
    source = "https://archive.ics.uci.edu/dataset/165/concrete+compressive+strength (saved as CSV)"
    features = (
        "Cement", "Blast_Furnace_Slag", "FlyAsh", "Water", "Superplasticizer", "Coarse_Aggregate",
        "Fine_Aggregate", "Age",
    )
    target = "strength"

    def load_arrays(self) -> tuple[np.ndarray, np.ndarray, list[str]]:
        header, rows = self.read()
        values = numeric_columns(header, rows, [*self.features, self.target], self.path, self.name)
        return values[:, :-1], values[:, -1], list(self.features)


class EnergyDataModule(ConcreteDataModule):
    """UCI Energy Efficiency (768 x 8 -> 691 train / 77 test), regression on ``Y1`` (heating load).

    Columns ``X1..X8`` are the features; ``Y2`` (cooling load) is dropped, as in the paper.
    """

    name = "Energy"
    filename = "energy_efficiency.csv"
    source = "https://archive.ics.uci.edu/dataset/242/energy+efficiency (saved as CSV)"
    features = tuple(f"X{i}" for i in range(1, 9))
    target = "Y1"


class HELOCDataModule(CSVDataModule):
    """FICO HELOC (Explainable ML Challenge): 10459 rows -> 9871 -> 8883 train / 988 test, binary.

    Label ``RiskPerformance`` (``Bad`` = 0, ``Good`` = 1), 23 features. Special values (as in the
    paper, following Wei et al. 2021), with column max / mean taken over the column's non-negative
    values of the kept rows:

    - rows whose every feature is ``-9`` (no bureau record) are dropped;
    - ``MSinceMostRecentDelq``: ``-7`` (never delinquent) -> max + 1, ``-8`` -> mean;
    - ``MSinceMostRecentInqexcl7days``: ``-7`` (no inquiry) -> 0, ``-8`` -> max + 1;
    - ``MaxDelq2PublicRecLast12M``: values above 7 -> 7;
    - every other negative special value (``-7``, ``-8``, ``-9``) -> the column mean.
    """

    task_kind = "classification"
    name = "HELOC"
    filename = "heloc.csv"
    source = "FICO's Explainable Machine Learning Challenge (https://community.fico.com/s/explainable-machine-learning-challenge)"
    label = "RiskPerformance"
    classes = ("Bad", "Good")

    def load_arrays(self) -> tuple[np.ndarray, np.ndarray, list[str]]:
        header, rows = self.read()
        require_columns(header, [self.label], self.path, self.name)
        names = [c for c in header if c != self.label]
        if len(names) != 23:
            raise ValueError(f"HELOC: {str(self.path)!r} should have 23 feature columns, found {len(names)}.")
        x = numeric_columns(header, rows, names, self.path, self.name)
        y = encode_labels([row[header.index(self.label)] for row in rows], self.classes, self.path, self.name)
        keep = ~(x == -9).all(axis=1)
        self.class_names = list(self.classes)
        return heloc_special_values(x[keep], names), y[keep], names


def heloc_special_values(x: np.ndarray, names: list[str]) -> np.ndarray:
    """Replace HELOC's special values (``-7, -8, -9``) as documented on :class:`HELOCDataModule`."""
    x = x.copy()
    for j, name in enumerate(names):
        col = x[:, j]
        valid = col >= 0
        if not valid.any():
            raise ValueError(f"HELOC: column {name!r} has no regular (non-negative) values.")
        top, mean = col[valid].max(), col[valid].mean()
        if name == "MSinceMostRecentDelq":
            col[col == -7] = top + 1
        elif name == "MSinceMostRecentInqexcl7days":
            col[col == -7] = 0
            col[col == -8] = top + 1
        elif name == "MaxDelq2PublicRecLast12M":
            col[col > 7] = 7
        col[col < 0] = mean
    return x


def encode_labels(values: list[str], classes: tuple[str, ...], path: Path, dataset: str) -> np.ndarray:
    """Class ids ``[n]`` of string labels, with a clear error for an unknown label."""
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted({v for v in values if v not in index})
    if unknown:
        raise ValueError(f"{dataset}: {str(path)!r} has unknown labels {unknown[:5]}; expected {list(classes)}.")
    return np.array([index[v] for v in values], dtype=np.int64)


def one_hot(values: np.ndarray, name: str) -> tuple[np.ndarray, list[str]]:
    """Dummy-code a column ``[n]`` into ``[n, k]`` (categories in sorted order) and its column names."""
    cats, codes = np.unique(values, return_inverse=True)
    return np.eye(len(cats))[codes], [f"{name}={c}" for c in cats]


class AdultDataModule(CSVDataModule):
    """UCI Adult (census income, 32561 rows), binary: the offline stand-in for Folktables ACSIncome.

    Label ``Salary`` (``<=50K`` = 0, ``>50K`` = 1). Numerical columns are standardised with training
    statistics; categorical ones are dummy-coded (``?`` counts as a category), as the paper does for
    ACSIncome. Default split: 75% / 25% (``test_size=0.25``), as for Folktables.
    """

    task_kind = "classification"
    name = "Adult"
    filename = "adult.csv"
    source = "https://archive.ics.uci.edu/dataset/2/adult (adult.data with the header row added)"
    numerical = ("age", "fnlwgt", "education-num", "capital-gain", "capital-loss", "hours-per-week")
    categorical = (
        "workclass", "education", "marital-status", "occupation", "relationship", "race", "sex",
        "native-country",
    )
    label = "Salary"
    classes = ("<=50K", ">50K")

    def __init__(
        self, data_dir: str | Path = "data", path: str | Path | None = None, test_size: float | int = 0.25,
        **kwargs: Any,
    ) -> None:
        super().__init__(data_dir=data_dir, path=path, test_size=test_size, **kwargs)

    def load_arrays(self) -> tuple[np.ndarray, np.ndarray, list[str]]:
        header, rows = self.read()
        require_columns(header, [*self.categorical, self.label], self.path, self.name)
        parts = [numeric_columns(header, rows, self.numerical, self.path, self.name)]
        names = list(self.numerical)
        for col in self.categorical:
            block, block_names = one_hot(np.array([row[header.index(col)] for row in rows]), col)
            parts.append(block)
            names += block_names
        labels = [row[header.index(self.label)].rstrip(".") for row in rows]  # adult.test writes ">50K."
        self.class_names = list(self.classes)
        self.numeric_features = list(self.numerical)
        return np.concatenate(parts, axis=1), encode_labels(labels, self.classes, self.path, self.name), names


ACS_INCOME_FEATURES = ("AGEP", "COW", "SCHL", "MAR", "OCCP", "POBP", "RELP", "WKHP", "SEX", "RAC1P")
ACS_INCOME_NUMERICAL = ("AGEP", "WKHP")


def encode_acs_income(features: np.ndarray, names: list[str]) -> tuple[np.ndarray, list[str]]:
    """ACSIncome features ``[n, 10]`` -> AGEP, WKHP as they are, every other column dummy-coded."""
    if sorted(names) != sorted(ACS_INCOME_FEATURES):
        raise ValueError(f"Folktables: expected the ACSIncome features {ACS_INCOME_FEATURES}, got {names}.")
    parts, out_names = [], []
    for col in ACS_INCOME_NUMERICAL:
        parts.append(features[:, [names.index(col)]].astype(np.float64))
        out_names.append(col)
    for col in names:
        if col not in ACS_INCOME_NUMERICAL:
            block, block_names = one_hot(features[:, names.index(col)], col)
            parts.append(block)
            out_names += block_names
    return np.concatenate(parts, axis=1), out_names


class FolktablesDataModule(TabularDataModule):
    """Folktables ACSIncome (Massachusetts, 2018, 1-Year person data; 30085 train / 10029 test), binary.

    Needs the ``folktables`` package (``pip install folktables``) and either the census files under
    ``data_dir`` or ``download=True`` with internet access. Label: income above USD 50,000. AGEP and
    WKHP are standardised with training statistics; the other features are dummy-coded; split 75% /
    25% with ``random_state=0``. Offline, use :class:`AdultDataModule` instead.
    """

    task_kind = "classification"
    name = "Folktables"

    def __init__(
        self, data_dir: str | Path = "data", state: str = "MA", year: str = "2018", download: bool = False,
        test_size: float | int = 0.25, **kwargs: Any,
    ) -> None:
        super().__init__(test_size=test_size, **kwargs)
        self.data_dir = Path(data_dir)
        self.state = state
        self.year = year
        self.download = download

    def load_arrays(self) -> tuple[np.ndarray, np.ndarray, list[str]]:
        try:
            from folktables import ACSDataSource, ACSIncome
        except ImportError as err:
            raise MissingExtraError(
                "FolktablesDataModule needs the `folktables` package: pip install folktables (it downloads "
                "census data from census.gov). Without internet access use AdultDataModule, the offline "
                "stand-in (UCI Adult from a local CSV)."
            ) from err
        source = ACSDataSource(survey_year=self.year, horizon="1-Year", survey="person", root_dir=str(self.data_dir))
        try:
            acs = source.get_data(states=[self.state], download=self.download)
        except Exception as err:
            raise FileNotFoundError(
                f"Folktables: could not load ACS {self.year} person data for {self.state} under "
                f"{str(self.data_dir)!r} (download={self.download}): {err}. Pass download=True with internet "
                "access, or use AdultDataModule offline."
            ) from err
        features, label, _ = ACSIncome.df_to_numpy(acs)
        x, names = encode_acs_income(np.asarray(features), list(ACSIncome.features))
        self.class_names = ["<=50K", ">50K"]
        self.numeric_features = list(ACS_INCOME_NUMERICAL)
        return x, np.asarray(label).astype(np.int64).reshape(-1), names
