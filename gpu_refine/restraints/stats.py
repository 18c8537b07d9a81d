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
    """A list with one dict per model of ``xyz`` (B,N,3)."""
    topo = restraints.topology
    bk = restraints.backend
    terms = {k: (bk.to_numpy(e), bk.to_numpy(d).astype(np.float64))
             for k, (e, d) in restraints.terms(xyz).items()}
    n_models = next(iter(terms.values()))[1].shape[0]
    results = []
    for m in range(n_models):
        r = dict(topo.counts())
        found = []      # every outlier as (|z|, type, index, its arrays); dicts for those listed
        for name in ("bonds", "angles", "torsions", "chirals", "planes"):
            delta = terms[name][1][m]
            if name in ANGULAR:
                delta = np.degrees(delta)
            sigma, ideal = _sigma_ideal(topo, name)
            if delta.size:
                ok = sigma > 0
                z = np.where(ok, delta / np.where(ok, sigma, 1.0), 0.0)
                r[f"rmsd_{name}"] = float(np.sqrt(np.mean(delta ** 2)))
                r[f"rmsz_{name}"] = float(np.sqrt(np.mean(z[ok] ** 2))) if ok.any() else 0.0
                r[f"max_{name}"] = float(np.abs(delta).max())
                found += [(abs(float(z[k])), name, k, delta, z, sigma, ideal)
                          for k in np.flatnonzero(np.abs(z) > z_outlier)]
            else:
                r[f"rmsd_{name}"] = r[f"rmsz_{name}"] = r[f"max_{name}"] = 0.0
        found.sort(key=lambda f: -f[0])
        r["n_outliers"] = len(found)
        r["outliers"] = [_outlier(topo, *f[1:]) for f in found[:max_outliers]]
        if "nonbonded" in terms:
            pl = restraints.pairs
            delta = terms["nonbonded"][1][m]
            overlap = -delta
            clash = overlap > restraints.nonbonded_settings.clash_overlap
            # A contact with a symmetry mate is listed from both sides at half weight.
            r["n_nonbonded"] = int(round(float(pl.weight.sum())))
            r["n_overlaps"] = int(np.ceil(float(pl.weight[clash].sum()) - 1e-9))
            if len(delta):
                k = int(np.argmax(overlap))
                r["worst_overlap"] = {"atoms": [_pair_label(topo, pl, a) for a in pl.pairs[k]],
                                      "distance": float(pl.dmin[k] + delta[k]),
                                      "min_distance": float(pl.dmin[k]),
                                      "overlap": float(overlap[k])}
        results.append(r)
    return results


def _outlier(topo, name, k, delta, z, sigma, ideal):
    return {"type": name[:-1], "atoms": [str(topo.labels[a]) for a in _member_atoms(topo, name)[k]],
            "ideal": float(ideal[k]),
            "model": float(ideal[k] + delta[k]) if name != "planes" else float(delta[k]),
            "delta": float(delta[k]), "sigma": float(sigma[k]), "z": float(z[k]),
            "unit": UNITS[name]}


def _pair_label(topo, pairs, a):
    """Label of atom ``a`` of a nonbonded pair (an index past the atoms is a symmetry mate)."""
    if a < topo.n_atoms:
        return str(topo.labels[a])
    return f"{topo.labels[pairs.mate_atom[a - topo.n_atoms]]} (symmetry mate)"
