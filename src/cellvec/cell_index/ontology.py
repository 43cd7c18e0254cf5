"""Cell Ontology ids for an atlas's labels: proposed from the label text (and, where a
class's cells say more than its name, from the genes they express), confirmed or
overridden by a person, stored with the atlas, written by mapping as CELLxGENE's
`obs['cell_type_ontology_term_id']`.

The ontology is the CL that the PyPI package `cellxgene-ontology-guide` ships offline
(the `ontology` extra): each term's label, synonyms and definition.

A label is proposed a term in this order:

1. **exact**: the label, with `_` read as a space and `CD14+` as `CD14-positive`, is a
   term's label or synonym (any case), as it is or with " cell" after it, or with the
   tissue hint in front ("beta" + pancreas -> "pancreatic beta cell"); a text naming
   several terms goes on to step 2 among them;
2. **text**: the same texts embedded by the gene store's text model, against every
   term's label and synonyms; a term's score is its best cosine. With a tissue hint,
   terms that name the tissue gain `TISSUE_BONUS`. With the class's marker genes
   (`class_markers`: the genes its cells weigh most above the others, from the atlas),
   the best `RERANK` candidates are re-ranked by the cosine of the markers' mean gene
   vector with each term's definition (`MARKER_WEIGHT`). Measured on the Baron and PBMC
   labels (benchmarks/ontology_labels.py) this changed no count but one (a loss), so it
   is off unless asked for;
3. **abstained** below `MIN_SCORE`: no id is better than a wrong one.

An override file (two columns: label, CL id; CSV or TSV) wins over every proposal.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cellvec._files import replacing
from cellvec.cell_index.mapping import read_label_map
from cellvec.errors import CellvecError
from cellvec.storage import META_KEY

log = logging.getLogger(__name__)

OBS_KEY = "cell_type_ontology_term_id"  # CELLxGENE's schema name
TISSUE_BONUS = 0.05
MARKER_WEIGHT = 0.5
RERANK = 10
MIN_SCORE = 0.6
N_MARKERS = 20


@dataclass
class CellOntology:
    """The CL: per term its label, synonyms and definition (deprecated terms left out)."""

    version: str
    ids: list[str]
    labels: list[str]
    synonyms: list[list[str]]
    definitions: list[str]
    _vectors: dict = field(default_factory=dict, repr=False)

    def texts(self) -> tuple[list[str], np.ndarray]:
        """(every label and synonym, the index of its term)."""
        texts, owner = [], []
        for i, (label, syns) in enumerate(zip(self.labels, self.synonyms)):
            for t in dict.fromkeys([label, *syns]):
                texts.append(t)
                owner.append(i)
        return texts, np.asarray(owner)

    def label_of(self, term_id: str) -> str | None:
        try:
            return self.labels[self.ids.index(term_id)]
        except ValueError:
            return None


def load_cell_ontology() -> CellOntology:
    """The Cell Ontology shipped by `cellxgene-ontology-guide` (its latest schema's CL)."""
    try:
        from cellxgene_ontology_guide.ontology_parser import OntologyParser
    except ImportError as e:
        raise CellvecError(
            "Cell Ontology ids need the package cellxgene-ontology-guide: pip install "
            "'cellvec[ontology]'."
        ) from e
    parser = OntologyParser()
    terms = parser.cxg_schema.ontology("CL")
    version = parser.cxg_schema.supported_ontologies["CL"]["version"]
    keep = [(k, v) for k, v in terms.items() if k.startswith("CL:") and not v.get("deprecated")]
    return CellOntology(
        version=version,
        ids=[k for k, _ in keep],
        labels=[v["label"] for _, v in keep],
        synonyms=[list(v.get("synonyms") or []) for _, v in keep],
        definitions=[v.get("description") or v["label"] for _, v in keep],
    )


# Shorthands of cell-type labels, read as words (whole tokens, any case).
SHORTHANDS = {
    "mono": "monocyte",
    "dc": "dendritic cell",
    "nk": "natural killer cell",
    "treg": "regulatory T cell",
    "t": "T cell",
    "b": "B cell",
    "mk": "megakaryocyte",
    "hsc": "hematopoietic stem cell",
}


def _normalise(label: str) -> str:
    """`_` as a space, `CD14+` and a bare `CD8` before a word as `CD14-positive`,
    `CD8-positive`, and the `SHORTHANDS` spelled out."""
    text = re.sub(r"[_]+", " ", str(label)).strip()
    text = re.sub(r"(?<=[A-Za-z0-9])\+", "-positive", text)
    text = re.sub(r"\b(CD\d+[A-Za-z]?)(?=\s)", r"\1-positive", text)
    words = [SHORTHANDS.get(w.lower(), w) for w in text.split()]
    text = " ".join(words)
    return re.sub(r"\bcell cell\b", "cell", re.sub(r"\s+", " ", text))


def _tissue_word(tissue: str | None) -> str | None:
    """The adjective a CL label uses for a tissue ("pancreas" -> "pancreatic")."""
    if not tissue:
        return None
    t = tissue.strip().lower()
    return {
        "pancreas": "pancreatic",
        "retina": "retinal",
        "blood": "blood",
        "liver": "hepatic",
    }.get(t, t)


def _queries(label: str, tissue: str | None) -> list[str]:
    """The texts a label is looked up by, the tissue-qualified ones first."""
    base = _normalise(label)
    plain = [base] if base.endswith("cell") else [f"{base} cell", base]
    word = _tissue_word(tissue)
    return list(dict.fromkeys(([f"{word} {q}" for q in plain] if word else []) + plain))


@dataclass
class Proposal:
    """The term proposed for one label: `id` (None when abstained), its CL label, the
    score behind it and how it was found (exact, text, markers, override, abstained)."""

    label: str
    id: str | None
    term: str | None
    score: float
    how: str

    def to_dict(self) -> dict:
        return {"id": self.id, "term": self.term, "score": round(self.score, 4), "how": self.how}


def read_overrides(path: str | Path) -> dict[str, str]:
    """Label -> CL id from a label map (`mapping.read_label_map`: two columns, CSV or TSV,
    or JSON), a header row allowed, every id checked to be a Cell Ontology id."""
    out = {}
    for n, (label, term) in enumerate(read_label_map(path).items()):
        label, term = label.strip(), term.strip()
        if not label:
            continue
        if not re.fullmatch(r"CL:\d{7}", term):
            if n == 0 and re.search(r"id|ontology|term", term, re.I):
                continue  # a header
            raise CellvecError(
                f"{path}: {term!r} (for label {label!r}) is not a Cell Ontology id such as "
                "CL:0000236; write two columns, label and CL id."
            )
        out[label] = term
    return out


def propose_ontology_ids(
    labels,
    *,
    embedder,
    tissue: str | None = None,
    class_markers: dict[str, np.ndarray] | None = None,
    overrides: dict[str, str] | None = None,
    ontology: CellOntology | None = None,
) -> dict[str, Proposal]:
    """A Cell Ontology term (or an abstention) for each label (see the module docstring).
    `embedder`: the text model of the gene store (its `embed(texts)` gives unit vectors);
    `class_markers`: per label, the unit-length mean vector of its marker genes (same
    model)."""
    onto = ontology or load_cell_ontology()
    overrides = overrides or {}
    texts, owner = onto.texts()
    text_vecs = _embedded(onto, embedder, "names", texts)
    def_vecs = _embedded(onto, embedder, "definitions", onto.definitions) if class_markers else None
    lower = {}
    for t, i in zip(texts, owner):
        lower.setdefault(t.lower(), set()).add(int(i))
    word = _tissue_word(tissue)
    names_tissue = np.zeros(len(onto.ids), dtype=bool)
    if word:
        stem = word[:6]
        names_tissue = np.array(
            [
                stem in (lab + " " + " ".join(syn)).lower()
                for lab, syn in zip(onto.labels, onto.synonyms)
            ]
        )
    out = {}
    for label in labels:
        label = str(label)
        if label in overrides:
            term = overrides[label]
            out[label] = Proposal(label, term, onto.label_of(term), 1.0, "override")
            continue
        queries = _queries(label, tissue)
        exact = set()
        for q in queries:
            exact |= lower.get(q.lower(), set())
            if exact:
                break
        if len(exact) == 1:
            i = exact.pop()
            out[label] = Proposal(label, onto.ids[i], onto.labels[i], 1.0, "exact")
            continue
        sims = _unit(embedder.embed(queries)) @ text_vecs.T  # queries x texts
        score = np.full(len(onto.ids), -1.0)
        np.maximum.at(score, owner, sims.max(0))
        score = score + TISSUE_BONUS * names_tissue
        if exact:  # a text naming several terms: choose among them
            only = np.full(len(onto.ids), -np.inf)
            only[list(exact)] = score[list(exact)]
            score = only
        how = "text"
        markers = (class_markers or {}).get(label)
        if markers is not None and def_vecs is not None:
            top = np.argsort(-score)[:RERANK]
            m = def_vecs[top] @ _unit(markers[None, :])[0]
            ranked = score[top] + MARKER_WEIGHT * (m - m.mean())
            best = int(top[int(np.argmax(ranked))])
            how = "markers" if best != int(top[0]) else "text"
        else:
            best = int(np.argmax(score))
        s = float(score[best])
        if s < MIN_SCORE:
            out[label] = Proposal(label, None, onto.labels[best], s, "abstained")
        else:
            out[label] = Proposal(label, onto.ids[best], onto.labels[best], s, how)
    return out


def _embedded(onto: CellOntology, embedder, what: str, texts: list[str]) -> np.ndarray:
    """`texts` embedded (unit rows), kept in memory and in `$CELLVEC_CACHE/ontology/`: the
    CL's ~6,000 names take minutes to embed on a few cores, once per model and CL version."""
    import hashlib

    from cellvec.fetch import cache_dir

    spec = str(getattr(embedder, "spec", type(embedder).__name__))
    digest = hashlib.sha256("\x1f".join([spec, *texts]).encode()).hexdigest()[:16]
    if digest in onto._vectors:
        return onto._vectors[digest]
    path = cache_dir() / "ontology" / f"CL-{onto.version}-{what}-{digest}.npy"
    if path.exists():
        vecs = np.load(path, allow_pickle=False)
    else:
        log.info("Embedding %s Cell Ontology %s with %s", f"{len(texts):,}", what, spec)
        vecs = _unit(embedder.embed(texts))
        with replacing(path) as tmp, open(tmp, "wb") as fh:
            np.save(fh, vecs)
    onto._vectors[digest] = vecs
    return vecs


def _unit(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def marker_vectors(
    profile: np.ndarray, classes, gene_vectors: np.ndarray, n: int = N_MARKERS
) -> dict[str, np.ndarray]:
    """Per class, the unit mean vector of its `n` marker genes: those whose mean weight
    (or expression) in the class (`profile`: classes x genes) is highest above the
    classes' average. `gene_vectors`: the genes' text vectors, in `profile`'s order."""
    lift = profile - profile.mean(0, keepdims=True)
    out = {}
    for c, name in enumerate(classes):
        top = np.argsort(-lift[c])[:n]
        out[str(name)] = _unit(gene_vectors[top].mean(0, keepdims=True))[0]
    return out


def class_markers(atlas, n: int = N_MARKERS) -> dict[str, np.ndarray]:
    """`marker_vectors` of a stored atlas, from its cells' top-gene weights (kept with it)
    and its genes' vectors in the gene table: no reference file needed."""
    import scipy.sparse as sp

    w = atlas.weights()
    classes, codes = atlas.label_codes()
    onehot = sp.csr_matrix(
        (np.ones(len(codes), np.float32), (codes, np.arange(len(codes)))),
        shape=(len(classes), len(codes)),
    )
    profile = (
        np.asarray((onehot @ w).todense()) / np.bincount(codes, minlength=len(classes))[:, None]
    )
    enc = atlas.encoder()
    return marker_vectors(profile, classes, enc.genes.vectors[enc.refinement["gene_rows"]], n)


def proposals_json(proposals: dict[str, Proposal], version: str, tissue: str | None) -> dict:
    """What the atlas's metadata keeps (`ontology`): the CL version, tissue hint, per label."""
    return {
        "cl_version": version,
        "tissue": tissue,
        "labels": {k: p.to_dict() for k, p in proposals.items()},
    }


def annotate_atlas(
    store,
    name: str,
    *,
    tissue: str | None = None,
    overrides: dict[str, str] | None = None,
    use_markers: bool = False,
) -> dict:
    """Propose (or override) a Cell Ontology id for each class of stored atlas `name` and
    record them in its metadata (`ontology`), where mapping finds them. Returns that entry."""
    from cellvec.cell_index.atlas import Atlas
    from cellvec.cell_index.table import stored_atlas
    from cellvec.gene_store.embedders import get_embedder

    _, meta = stored_atlas(store, name)  # classes and model: the atlas is opened for markers only
    onto = load_cell_ontology()
    props = propose_ontology_ids(
        sorted(meta.get("classes") or {}),
        embedder=get_embedder(meta["recipe"]["model"]),
        tissue=tissue,
        class_markers=class_markers(Atlas.open(store, name)) if use_markers else None,
        overrides=overrides,
        ontology=onto,
    )
    entry = proposals_json(props, onto.version, tissue)
    ds, meta = stored_atlas(store, name)  # as it is now, after minutes of embedding
    ds.update_schema_metadata({META_KEY.decode(): json.dumps({**meta, "ontology": entry})})
    return entry
