"""Geometry statistics per model of a batch: rmsd / rmsZ per restraint type, outliers, overlaps.

rmsd: root mean square deviation from the ideal values (Å, degrees, Å³; planes: the members'
distances from their best planes).  rmsZ: root mean square of deviation / sigma over restraints
with sigma > 0.  Outliers: restraints with |deviation / sigma| above ``z_outlier`` (4, as
MolProbity and phenix use), worst first.  Overlaps: nonbonded pairs closer than their minimum
distance by more than ``clash_overlap``.
"""
import numpy as np

UNITS = {"bonds": "Å", "angles": "°", "torsions": "°", "chirals": "Å³", "planes": "Å"}
ANGULAR = ("angles", "torsions")
TYPES = ("bonds", "angles", "torsions", "chirals", "planes")


def _member_atoms(topology, name):
    """(R, k) atom indices of each reported deviation."""
    if name == "planes":
        return topology.planes.atoms[:, None]
    return getattr(topology, name).atoms


def _sigma_ideal(topology, name):
    terms = getattr(topology, name)
    if name == "planes":
        return terms.sigma, np.zeros(len(terms.sigma))
    ideal = terms.ideal
    if name == "chirals":
        ideal = ideal * np.where(terms.sign < 0, -1.0, 1.0)
    return terms.sigma, ideal


def geometry_statistics(restraints, xyz, z_outlier=4.0, max_outliers=20):
    """A list with one dict per model of ``xyz`` (B,N,3).

    The sums run over the whole batch on the restraints' backend; only per-model numbers and
    the listed outliers come back to the host."""
    topo = restraints.topology
    bk = restraints.backend
    xp = bk.xp
    terms = restraints.terms(xyz)
    n_models = next(iter(terms.values()))[1].shape[0]
    results = [dict(topo.counts()) for _ in range(n_models)]
    counts = np.zeros(n_models, dtype=int)
    found = []      # per type: (|z|, type order, restraint index, model, delta) of its outliers
    for order, name in enumerate(TYPES):
        delta = terms[name][1].astype(xp.float64)
        if delta.shape[1] == 0:
            for r in results:
                r[f"rmsd_{name}"] = r[f"rmsz_{name}"] = r[f"max_{name}"] = 0.0
            continue
        if name in ANGULAR:
            delta = xp.degrees(delta)
        sigma, _ = _sigma_ideal(topo, name)
        ok = sigma > 0
        z = delta * xp.asarray(np.where(ok, 1.0 / np.where(ok, sigma, 1.0), 0.0))[None]
        columns = {f"rmsd_{name}": xp.sqrt(xp.mean(delta ** 2, axis=1)),
                   f"rmsz_{name}": xp.sqrt((z ** 2).sum(axis=1) / max(int(ok.sum()), 1)),
                   f"max_{name}": xp.abs(delta).max(axis=1)}
        outlier = xp.abs(z) > z_outlier
        counts += bk.to_numpy(outlier.sum(axis=1)).astype(int)
        for key, value in columns.items():
            for r, v in zip(results, bk.to_numpy(value).tolist()):
                r[key] = float(v)
        if max_outliers > 0:
            m, k = (bk.to_numpy(a) for a in xp.nonzero(outlier))
            d = bk.to_numpy(delta[xp.asarray(m), xp.asarray(k)])
            found.append((np.abs(d / sigma[k]), np.full(len(m), order), k, m, d))
    for r, c in zip(results, counts.tolist()):
        r["n_outliers"] = c
        r["outliers"] = []
    if found:
        az, order, k, m, d = (np.concatenate([f[i] for f in found]) for i in range(5))
        refs = {name: _sigma_ideal(topo, name) for name in TYPES}
        # Worst first; ties in type order, then restraint order (as listed by the topology).
        for i in np.lexsort((k, order, -az)):
            r = results[m[i]]
            if len(r["outliers"]) < max_outliers:
                name = TYPES[order[i]]
                r["outliers"].append(_outlier(topo, name, int(k[i]), float(d[i]), *refs[name]))
    if "nonbonded" in terms:
        _overlaps(restraints, terms["nonbonded"][1], results)
    return results


def _overlaps(restraints, delta, results):
    """Nonbonded counts, overlaps and the worst overlap of each model (delta = d - dmin)."""
    bk = restraints.backend
    xp = bk.xp
    topo = restraints.topology
    pl = restraints.pairs
    overlap = -delta.astype(xp.float64)
    clash = overlap > restraints.nonbonded_settings.clash_overlap
    # A contact with a symmetry mate is listed from both sides at half weight.
    weight = xp.asarray(pl.weight, dtype=xp.float64)
    n_overlaps = bk.to_numpy((clash * weight[None]).sum(axis=1))
    n_nonbonded = int(round(float(pl.weight.sum())))
    worst = bk.to_numpy(xp.argmax(overlap, axis=1)) if overlap.shape[1] else None
    worst_overlap = (None if worst is None else
                     bk.to_numpy(xp.take_along_axis(overlap, xp.asarray(worst)[:, None], 1))[:, 0])
    for m, r in enumerate(results):
        r["n_nonbonded"] = n_nonbonded
        r["n_overlaps"] = int(np.ceil(float(n_overlaps[m]) - 1e-9))
        if worst is not None:
            k, o = int(worst[m]), float(worst_overlap[m])
            r["worst_overlap"] = {"atoms": [_pair_label(topo, pl, a) for a in pl.pairs[k]],
                                  "distance": float(pl.dmin[k] - o),
                                  "min_distance": float(pl.dmin[k]), "overlap": o}


def _outlier(topo, name, k, delta, sigma, ideal):
    """The record of restraint ``k`` of type ``name`` at deviation ``delta``."""
    return {"type": name[:-1], "atoms": [topo.label(a) for a in _member_atoms(topo, name)[k]],
            "ideal": float(ideal[k]),
            "model": float(ideal[k] + delta) if name != "planes" else delta,
            "delta": delta, "sigma": float(sigma[k]), "z": delta / float(sigma[k]),
            "unit": UNITS[name]}


def _pair_label(topo, pairs, a):
    """Label of atom ``a`` of a nonbonded pair (an index past the atoms is a symmetry mate)."""
    if a < topo.n_atoms:
        return str(topo.labels[a])
    return f"{topo.labels[pairs.mate_atom[a - topo.n_atoms]]} (symmetry mate)"
