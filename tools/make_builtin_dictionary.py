"""Write the built-in restraint dictionary (gpu_refine/restraints/monomers) from the tables here.

Amino acids: Engh & Huber (2001), "Structure quality and target parameters", International
Tables for Crystallography vol. F, ch. 18.3 (bond lengths, angles and their sigmas of the amino
acids, the peptide link and the disulfide bridge; sigmas rounded).  Where our recollection of
the 2001 table was uncertain the 1991 value (Engh & Huber, Acta Cryst. A47, 392) is used: MET
SD-CE and the PRO C-N-CD link angle.  UNK (an amino acid of unknown type, as automated model
building writes it) has the atoms of the CCP4 library's UNK, N CA C O CB CG, with the backbone
values and MET's CA-CB, CB-CG and CA-CB-CG.

Nucleotides (A, C, G, U, DA, DC, DG, DT): Parkinson, Vojtechovsky, Clowney, Brunger & Berman
(1996), Acta Cryst. D52, 57-64: sugar-phosphate backbone from its RNA (C3'-endo) and DNA
(C2'-endo) tables (after Gelbin et al. 1996), bases after Clowney et al. (1996); base sigmas
rounded up to 0.010 Å and 1.0°.  The terminal OP3 (absent from the paper) takes the OP1/OP2
bond and a tetrahedral 109.5 ± 3.0° for its angles.  Sugar chiral signs are those of
beta-D-(2'-deoxy)ribose; base planes include C1'.

Hydrogens (PDB names, as in the wwPDB chemical components and the CCP4 library; monomers
as zwitterions, N-H2/H3 and O3'-H removed by the chain links).  Their restraints follow from
the heavy-atom tables and each parent's hybridisation (its number of neighbours):
X-H distances for the nucleus from the neutron means of Allen & Bruno (2010), Acta Cryst. B66,
380-386 (C-H methine 1.099, methylene 1.092, methyl 1.077, aromatic 1.083; N-H 1.009, in NH3+
1.033; O-H 0.970; S-H 1.338 Å), and for the electron cloud (X-ray, the default) the riding
distances of SHELXL (Sheldrick 2015, Acta Cryst. C71, 3-8: C-H 0.98 / 0.97 / 0.96 / 0.93, N-H
0.86, in NH3+ 0.89, O-H 0.82, S-H 1.20 Å).  Angles: tetrahedral 109.47° at four-coordinate
parents, except that a methine H makes equal angles with its three bonds (SHELXL's AFIX 13
geometry); at planar (three-coordinate) parents an H bisects the outer angle of its two heavy
neighbours, 180 - θ/2, or takes 120° in an NH2 group, and joins the parent's planes; C-S-H
96.5° (methanethiol); H-O-H of water 104.5°.  No torsions for H (methyl and hydroxyl groups
rotate freely).

Chiral volumes are signed for L-amino acids; planes use sigma 0.02 Å.  Bond sigmas are
written at most 0.030 Å: Engh & Huber's 0.069 Å for ILE CG1-CD1 and 0.056 Å for MET SD-CE
describe terminal atoms often disordered in the structures surveyed, not a softer bond, and
let a 3 Å map compress the bond (EMD-2566, ILE 191 refined to 1.41 Å; with 0.030 Å to 1.50 Å).

Run from the repository root:  python tools/make_builtin_dictionary.py
"""
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parents[1] / "gpu_refine" / "restraints" / "monomers"
BOND_SIGMA_CAP = 0.030   # Å (see above)

# Backbone of every standard amino acid except GLY and PRO (Engh & Huber 2001, table 18.3.2.2).
BACKBONE_ATOMS = "N:N:NH1 CA:C:CH1 C:C:C O:O:O OXT:O:OC"
BACKBONE_BONDS = "N-CA 1.459 0.020, CA-C 1.525 0.026, C-O 1.229 0.019, C-OXT 1.250 0.020"
BACKBONE_ANGLES = "N-CA-C 111.0 2.7, CA-C-O 120.1 2.1, CA-C-OXT 117.0 2.0, O-C-OXT 122.9 2.0"
CB_ANGLES = "N-CA-CB 110.6 1.8, C-CA-CB 110.4 2.0"

# name: (atoms "name:element:energy_type", bonds, angles, chirals, planes), side chains after CB.
RESIDUES = {
    "ALA": ("CB:C:CH3", "CA-CB 1.520 0.021", "N-CA-CB 110.1 1.4, C-CA-CB 110.1 1.5", "", ""),
    "SER": ("CB:C:CH2 OG:O:OH1", "CA-CB 1.525 0.015, CB-OG 1.417 0.020",
            "CA-CB-OG 111.2 2.7", "", ""),
    "CYS": ("CB:C:CH2 SG:S:SH1", "CA-CB 1.526 0.013, CB-SG 1.812 0.016",
            "CA-CB-SG 114.2 1.1", "", ""),
    "THR": ("CB:C:CH1 OG1:O:OH1 CG2:C:CH3",
            "CA-CB 1.529 0.026, CB-OG1 1.428 0.020, CB-CG2 1.519 0.033",
            "N-CA-CB 110.3 1.9, C-CA-CB 111.6 2.7, CA-CB-OG1 109.2 2.0, CA-CB-CG2 111.5 2.2, "
            "OG1-CB-CG2 109.3 2.1", "CB CA OG1 CG2 positive", ""),
    "VAL": ("CB:C:CH1 CG1:C:CH3 CG2:C:CH3",
            "CA-CB 1.543 0.021, CB-CG1 1.524 0.021, CB-CG2 1.524 0.021",
            "N-CA-C 109.0 2.7, N-CA-CB 111.5 2.2, C-CA-CB 111.4 1.9, CA-CB-CG1 110.7 1.6, CA-CB-CG2 110.4 1.7, "
            "CG1-CB-CG2 110.9 1.6", "CB CA CG1 CG2 negative", ""),
    "ILE": ("CB:C:CH1 CG1:C:CH2 CG2:C:CH3 CD1:C:CH3",
            "CA-CB 1.544 0.023, CB-CG1 1.536 0.028, CB-CG2 1.524 0.031, CG1-CD1 1.500 0.069",
            "N-CA-C 109.0 2.7, N-CA-CB 110.8 2.3, C-CA-CB 111.5 2.0, CA-CB-CG1 110.4 1.7, CA-CB-CG2 110.5 1.9, "
            "CG1-CB-CG2 111.4 2.2, CB-CG1-CD1 113.8 2.1", "CB CA CG1 CG2 positive", ""),
    "LEU": ("CB:C:CH2 CG:C:CH1 CD1:C:CH3 CD2:C:CH3",
            "CA-CB 1.533 0.023, CB-CG 1.521 0.029, CG-CD1 1.521 0.033, CG-CD2 1.521 0.033",
            "CA-CB-CG 115.3 2.3, CB-CG-CD1 110.7 1.7, CB-CG-CD2 110.7 1.7, "
            "CD1-CG-CD2 110.5 1.6", "CG CB CD1 CD2 negative", ""),
    "MET": ("CB:C:CH2 CG:C:CH2 SD:S:S2 CE:C:CH3",
            "CA-CB 1.535 0.022, CB-CG 1.509 0.032, CG-SD 1.807 0.026, SD-CE 1.791 0.056",
            "CA-CB-CG 114.1 2.0, CB-CG-SD 112.7 3.0, CG-SD-CE 100.2 1.6", "", ""),
    "UNK": ("CB:C:CH2 CG:C:CH3", "CA-CB 1.535 0.022, CB-CG 1.509 0.032", "CA-CB-CG 114.1 2.0",
            "", ""),
    "MSE": ("CB:C:CH2 CG:C:CH2 SE:SE:SE CE:C:CH3",
            "CA-CB 1.535 0.022, CB-CG 1.509 0.032, CG-SE 1.950 0.020, SE-CE 1.950 0.020",
            "CA-CB-CG 114.1 2.0, CB-CG-SE 112.7 3.0, CG-SE-CE 98.9 2.0", "", ""),
    "ASP": ("CB:C:CH2 CG:C:C OD1:O:OC OD2:O:OC",
            "CA-CB 1.535 0.022, CB-CG 1.513 0.021, CG-OD1 1.249 0.023, CG-OD2 1.249 0.023",
            "CA-CB-CG 113.4 2.2, CB-CG-OD1 118.4 2.3, CB-CG-OD2 118.4 2.3, "
            "OD1-CG-OD2 123.3 1.9", "", "CB CG OD1 OD2"),
    "GLU": ("CB:C:CH2 CG:C:CH2 CD:C:C OE1:O:OC OE2:O:OC",
            "CA-CB 1.535 0.022, CB-CG 1.517 0.019, CG-CD 1.515 0.015, CD-OE1 1.252 0.011, "
            "CD-OE2 1.252 0.011",
            "CA-CB-CG 114.1 2.0, CB-CG-CD 113.3 2.5, CG-CD-OE1 118.3 2.0, CG-CD-OE2 118.3 2.0, "
            "OE1-CD-OE2 123.3 1.2", "", "CG CD OE1 OE2"),
    "ASN": ("CB:C:CH2 CG:C:C OD1:O:O ND2:N:NH2",
            "CA-CB 1.527 0.026, CB-CG 1.506 0.023, CG-OD1 1.235 0.022, CG-ND2 1.324 0.025",
            "CA-CB-CG 112.6 1.6, CB-CG-OD1 120.8 2.0, CB-CG-ND2 116.4 1.5, "
            "OD1-CG-ND2 122.6 1.8", "", "CB CG OD1 ND2"),
    "GLN": ("CB:C:CH2 CG:C:CH2 CD:C:C OE1:O:O NE2:N:NH2",
            "CA-CB 1.535 0.022, CB-CG 1.521 0.027, CG-CD 1.506 0.023, CD-OE1 1.235 0.022, "
            "CD-NE2 1.324 0.025",
            "CA-CB-CG 113.8 2.2, CB-CG-CD 112.6 2.6, CG-CD-OE1 120.8 2.0, CG-CD-NE2 116.4 1.5, "
            "OE1-CD-NE2 122.6 1.8", "", "CG CD OE1 NE2"),
    "LYS": ("CB:C:CH2 CG:C:CH2 CD:C:CH2 CE:C:CH2 NZ:N:NT3",
            "CA-CB 1.535 0.022, CB-CG 1.521 0.027, CG-CD 1.520 0.030, CD-CE 1.508 0.025, "
            "CE-NZ 1.486 0.025",
            "CA-CB-CG 113.8 2.2, CB-CG-CD 111.5 2.6, CG-CD-CE 111.5 2.7, CD-CE-NZ 111.7 2.3",
            "", ""),
    "ARG": ("CB:C:CH2 CG:C:CH2 CD:C:CH2 NE:N:NH1 CZ:C:C NH1:N:NH2 NH2:N:NH2",
            "CA-CB 1.535 0.022, CB-CG 1.521 0.027, CG-CD 1.515 0.025, CD-NE 1.460 0.017, "
            "NE-CZ 1.326 0.013, CZ-NH1 1.326 0.013, CZ-NH2 1.326 0.013",
            "CA-CB-CG 113.8 2.2, CB-CG-CD 111.3 2.3, CG-CD-NE 112.0 2.2, CD-NE-CZ 124.2 1.5, "
            "NE-CZ-NH1 120.3 0.5, NE-CZ-NH2 120.3 0.5, NH1-CZ-NH2 119.4 1.1", "",
            "CD NE CZ NH1 NH2"),
    "HIS": ("CB:C:CH2 CG:C:C5 ND1:N:NR5 CD2:C:CR15 CE1:C:CR15 NE2:N:NR5",
            "CA-CB 1.535 0.022, CB-CG 1.497 0.014, CG-ND1 1.379 0.013, CG-CD2 1.354 0.011, "
            "ND1-CE1 1.321 0.010, CD2-NE2 1.374 0.011, CE1-NE2 1.321 0.010",
            "CA-CB-CG 113.6 1.7, CB-CG-ND1 122.7 1.5, CB-CG-CD2 131.0 1.5, "
            "ND1-CG-CD2 106.3 1.0, CG-ND1-CE1 109.0 1.0, ND1-CE1-NE2 108.5 1.0, "
            "CE1-NE2-CD2 109.0 1.0, CG-CD2-NE2 107.2 1.0", "", "CB CG ND1 CD2 CE1 NE2"),
    "PHE": ("CB:C:CH2 CG:C:CR6 CD1:C:CR16 CD2:C:CR16 CE1:C:CR16 CE2:C:CR16 CZ:C:CR16",
            "CA-CB 1.535 0.022, CB-CG 1.509 0.017, CG-CD1 1.384 0.021, CG-CD2 1.384 0.021, "
            "CD1-CE1 1.388 0.020, CD2-CE2 1.388 0.020, CE1-CZ 1.382 0.030, CE2-CZ 1.382 0.030",
            "CA-CB-CG 113.9 2.4, CB-CG-CD1 120.8 0.7, CB-CG-CD2 120.8 0.7, "
            "CD1-CG-CD2 118.3 1.3, CG-CD1-CE1 120.8 1.1, CG-CD2-CE2 120.8 1.1, "
            "CD1-CE1-CZ 120.1 1.2, CD2-CE2-CZ 120.1 1.2, CE1-CZ-CE2 120.0 1.8", "",
            "CB CG CD1 CD2 CE1 CE2 CZ"),
    "TYR": ("CB:C:CH2 CG:C:CR6 CD1:C:CR16 CD2:C:CR16 CE1:C:CR16 CE2:C:CR16 CZ:C:CR6 OH:O:OH1",
            "CA-CB 1.535 0.022, CB-CG 1.512 0.015, CG-CD1 1.387 0.013, CG-CD2 1.387 0.013, "
            "CD1-CE1 1.389 0.015, CD2-CE2 1.389 0.015, CE1-CZ 1.381 0.013, CE2-CZ 1.381 0.013, "
            "CZ-OH 1.374 0.017",
            "CA-CB-CG 113.4 1.9, CB-CG-CD1 121.0 0.6, CB-CG-CD2 121.0 0.6, "
            "CD1-CG-CD2 117.9 1.1, CG-CD1-CE1 121.3 0.8, CG-CD2-CE2 121.3 0.8, "
            "CD1-CE1-CZ 119.8 0.9, CD2-CE2-CZ 119.8 0.9, CE1-CZ-CE2 119.8 1.6, "
            "CE1-CZ-OH 120.1 2.7, CE2-CZ-OH 120.1 2.7", "",
            "CB CG CD1 CD2 CE1 CE2 CZ OH"),
    "TRP": ("CB:C:CH2 CG:C:C5 CD1:C:CR15 CD2:C:CR56 NE1:N:NR15 CE2:C:CR56 CE3:C:CR16 "
            "CZ2:C:CR16 CZ3:C:CR16 CH2:C:CR16",
            "CA-CB 1.535 0.022, CB-CG 1.498 0.018, CG-CD1 1.363 0.014, CG-CD2 1.432 0.017, "
            "CD1-NE1 1.375 0.017, NE1-CE2 1.371 0.013, CD2-CE2 1.409 0.012, "
            "CD2-CE3 1.399 0.015, CE2-CZ2 1.394 0.021, CE3-CZ3 1.382 0.022, "
            "CZ2-CH2 1.369 0.019, CZ3-CH2 1.396 0.020",
            "CA-CB-CG 113.6 1.9, CB-CG-CD1 126.9 1.5, CB-CG-CD2 126.8 1.4, "
            "CD1-CG-CD2 106.3 0.8, CG-CD1-NE1 110.1 1.0, CD1-NE1-CE2 109.0 0.9, "
            "NE1-CE2-CD2 107.3 1.0, CG-CD2-CE2 107.3 0.8, CG-CD2-CE3 133.9 0.9, "
            "CE2-CD2-CE3 118.7 1.2, NE1-CE2-CZ2 130.4 1.1, CD2-CE2-CZ2 122.3 1.2, "
            "CD2-CE3-CZ3 118.8 1.0, CE2-CZ2-CH2 117.4 1.0, CE3-CZ3-CH2 121.2 1.1, "
            "CZ2-CH2-CZ3 121.6 1.2", "",
            "CB CG CD1 CD2 NE1 CE2 CE3 CZ2 CZ3 CH2"),
}

GLY = ("N:N:NH1 CA:C:CH2 C:C:C O:O:O OXT:O:OC",
       "N-CA 1.456 0.015, CA-C 1.514 0.016, C-O 1.232 0.016, C-OXT 1.250 0.020",
       "N-CA-C 113.1 2.5, CA-C-O 120.6 1.8, CA-C-OXT 117.0 2.0, O-C-OXT 122.4 2.0", "", "")
PRO = ("N:N:N CA:C:CH1 C:C:C O:O:O OXT:O:OC CB:C:CH2 CG:C:CH2 CD:C:CH2",
       "N-CA 1.468 0.017, CA-C 1.524 0.020, C-O 1.228 0.020, C-OXT 1.250 0.020, "
       "CA-CB 1.531 0.020, CB-CG 1.502 0.033, CG-CD 1.502 0.033, CD-N 1.474 0.014",
       "N-CA-C 112.1 2.6, CA-C-O 120.2 2.4, CA-C-OXT 117.0 2.0, O-C-OXT 122.8 2.0, "
       "N-CA-CB 103.3 1.2, C-CA-CB 111.7 2.1, CA-CB-CG 104.8 1.9, CB-CG-CD 106.5 3.9, "
       "CG-CD-N 103.2 1.5, CD-N-CA 111.7 1.4",
       "CA N C CB positive", "")

# Hydrogens of each monomer, "parent:H1,H2" (the backbone's are added to every amino acid).
BACKBONE_H = "N:H,H2,H3 CA:HA"
HYDROGENS = {
    "ALA": "CB:HB1,HB2,HB3",
    "ARG": "CB:HB2,HB3 CG:HG2,HG3 CD:HD2,HD3 NE:HE NH1:HH11,HH12 NH2:HH21,HH22",
    "ASN": "CB:HB2,HB3 ND2:HD21,HD22",
    "ASP": "CB:HB2,HB3",
    "CYS": "CB:HB2,HB3 SG:HG",
    "GLN": "CB:HB2,HB3 CG:HG2,HG3 NE2:HE21,HE22",
    "GLU": "CB:HB2,HB3 CG:HG2,HG3",
    "GLY": "N:H,H2,H3 CA:HA2,HA3",
    "HIS": "CB:HB2,HB3 ND1:HD1 CD2:HD2 CE1:HE1 NE2:HE2",
    "ILE": "CB:HB CG1:HG12,HG13 CG2:HG21,HG22,HG23 CD1:HD11,HD12,HD13",
    "LEU": "CB:HB2,HB3 CG:HG CD1:HD11,HD12,HD13 CD2:HD21,HD22,HD23",
    "LYS": "CB:HB2,HB3 CG:HG2,HG3 CD:HD2,HD3 CE:HE2,HE3 NZ:HZ1,HZ2,HZ3",
    "MET": "CB:HB2,HB3 CG:HG2,HG3 CE:HE1,HE2,HE3",
    "MSE": "CB:HB2,HB3 CG:HG2,HG3 CE:HE1,HE2,HE3",
    "UNK": "CB:HB1,HB2 CG:HG1,HG2,HG3",
    "PHE": "CB:HB2,HB3 CD1:HD1 CD2:HD2 CE1:HE1 CE2:HE2 CZ:HZ",
    "PRO": "N:H,H2 CA:HA CB:HB2,HB3 CG:HG2,HG3 CD:HD2,HD3",
    "SER": "CB:HB2,HB3 OG:HG",
    "THR": "CB:HB OG1:HG1 CG2:HG21,HG22,HG23",
    "TRP": "CB:HB2,HB3 CD1:HD1 NE1:HE1 CE3:HE3 CZ2:HZ2 CZ3:HZ3 CH2:HH2",
    "TYR": "CB:HB2,HB3 CD1:HD1 CD2:HD2 CE1:HE1 CE2:HE2 OH:HH",
    "VAL": "CB:HB CG1:HG11,HG12,HG13 CG2:HG21,HG22,HG23",
    "RNA": "C5':H5',H5'' C4':H4' C3':H3' O3':HO3' C2':H2' O2':HO2' C1':H1'",
    "DNA": "C5':H5',H5'' C4':H4' C3':H3' O3':HO3' C2':H2',H2'' C1':H1'",
    "A": "C8:H8 N6:H61,H62 C2:H2",
    "G": "C8:H8 N1:H1 N2:H21,H22",
    "C": "N4:H41,H42 C5:H5 C6:H6",
    "T": "N3:H3 C7:H71,H72,H73 C6:H6",
    "U": "N3:H3 C5:H5 C6:H6",
    "HOH": "O:H1,H2",
}
# X-H (electron cloud, nucleus) in Å by parent element, hybridisation and H count (see above).
XH_DISTANCES = {("C", 4, 1): (0.98, 1.099), ("C", 4, 2): (0.97, 1.092),
                ("C", 4, 3): (0.96, 1.077), ("C", 3): (0.93, 1.083), ("N", 3): (0.86, 1.009),
                ("N", 4): (0.89, 1.033), ("O",): (0.82, 0.970), ("S",): (1.20, 1.338)}
XH_SIGMA = 0.020
H_ANGLE_SIGMA = 1.5        # X-P-H
HH_ANGLE_SIGMA = 3.0       # H-P-H


def _xh_distance(element, coordination, n_h):
    for key in ((element, coordination, n_h), (element, coordination), (element,)):
        if key in XH_DISTANCES:
            return XH_DISTANCES[key]
    raise KeyError(f"no X-H distance for {element} with {coordination} neighbours")


def _angle_table(angles):
    table = {}
    for spec, value, _ in _items(angles):
        a, b, c = spec.split("-")
        table[(a, b, c)] = table[(c, b, a)] = float(value)
    return table


def _methine_angle(ideal, parent, others):
    """X-P-H of a methine H making equal angles with its three bonds X_i (SHELXL's AFIX 13
    geometry): for the unit bond vectors' Gram matrix G, cos = -1 / sqrt(1' G^-1 1)."""
    cos = np.eye(3)
    for i in range(3):
        for j in range(i + 1, 3):
            cos[i, j] = cos[j, i] = np.cos(np.radians(ideal[(others[i], parent, others[j])]))
    return float(np.degrees(np.arccos(-1.0 / np.sqrt(np.linalg.inv(cos).sum()))))


def hydrogen_terms(atoms, bonds, angles, planes, hydrogens):
    """Atoms, bonds (name-name electron esd nucleus esd), angles and planes of the hydrogens
    ``hydrogens`` ("parent:H1,H2 ...") of a monomer with the given heavy-atom tables."""
    element = {a.split(":")[0]: a.split(":")[1] for a in atoms.split()}
    heavy = {n: [] for n in element}
    for spec, _, _ in _items(bonds):
        a, b = spec.split("-")
        heavy[a].append(b)
        heavy[b].append(a)
    ideal = _angle_table(angles)
    h_atoms, h_bonds, h_angles = [], [], []
    planes = [p for p in planes if p]
    for group in hydrogens.split():
        parent, names = group.split(":")
        hs = names.split(",")
        others = heavy[parent]
        coordination = len(others) + len(hs)
        dist, nucleus = _xh_distance(element[parent], coordination, len(hs))
        for h in hs:
            h_atoms.append(f"{h}:H:H")
            h_bonds.append(f"{parent}-{h} {dist} {XH_SIGMA} {nucleus} {XH_SIGMA}")
        if element[parent] == "S":
            h_angles += [f"{x}-{parent}-{h} 96.5 3.0" for x in others for h in hs]
        elif parent == "O" and not others:                          # water
            h_angles.append(f"{hs[0]}-O-{hs[1]} 104.5 {HH_ANGLE_SIGMA}")
        elif coordination == 3 and element[parent] in "CN":        # planar parent
            if len(others) == 2:
                outer = 180.0 - ideal[(others[0], parent, others[1])] / 2.0
                h_angles += [f"{x}-{parent}-{hs[0]} {outer:.2f} {H_ANGLE_SIGMA}" for x in others]
            else:
                h_angles += [f"{others[0]}-{parent}-{h} 120.0 {H_ANGLE_SIGMA}" for h in hs]
                h_angles.append(f"{hs[0]}-{parent}-{hs[1]} 120.0 {HH_ANGLE_SIGMA}")
            planes = [f"{p} {' '.join(hs)}" if parent in p.split() else p for p in planes]
        elif len(others) == 3:                                      # methine
            angle = _methine_angle(ideal, parent, others)
            h_angles += [f"{x}-{parent}-{hs[0]} {angle:.2f} {H_ANGLE_SIGMA}" for x in others]
        else:                                                       # tetrahedral parent
            h_angles += [f"{x}-{parent}-{h} 109.47 {H_ANGLE_SIGMA}" for x in others for h in hs]
            h_angles += [f"{a}-{parent}-{b} 109.47 {HH_ANGLE_SIGMA}"
                         for i, a in enumerate(hs) for b in hs[i + 1:]]
    return " ".join(h_atoms), ", ".join(h_bonds), ", ".join(h_angles), planes


IONS = {"NA": "NA", "K": "K", "MG": "MG", "CA": "CA", "ZN": "ZN", "MN": "MN", "FE": "FE",
        "FE2": "FE", "CU": "CU", "NI": "NI", "CO": "CO", "CD": "CD", "CL": "CL", "BR": "BR",
        "IOD": "I"}

# Nucleotides (Parkinson et al. 1996).  "N" in the sugar tables stands for the base atom bound
# to C1': N9 of purines, N1 of pyrimidines.
PHOSPHATE_ATOMS = "OP3:O:OP P:P:P OP1:O:OP OP2:O:OP O5':O:O2 C5':C:CH2 C4':C:CH1 O4':O:O2"
PHOSPHATE_BONDS = "P-OP1 1.485 0.017, P-OP2 1.485 0.017, P-OP3 1.485 0.017, P-O5' 1.593 0.010"
PHOSPHATE_ANGLES = ("OP1-P-OP2 119.6 1.5, O5'-P-OP1 108.1 2.9, O5'-P-OP2 108.3 2.7, "
                    "OP3-P-OP1 109.5 3.0, OP3-P-OP2 109.5 3.0, OP3-P-O5' 109.5 3.0, "
                    "P-O5'-C5' 120.9 1.6, O5'-C5'-C4' 110.2 1.4")
SUGARS = {
    "RNA": ("C3':C:CH1 O3':O:OH1 C2':C:CH1 O2':O:OH1 C1':C:CH1",
            "O5'-C5' 1.440 0.016, C5'-C4' 1.510 0.013, C4'-C3' 1.524 0.011, "
            "C3'-C2' 1.525 0.011, C2'-C1' 1.528 0.010, O4'-C1' 1.414 0.012, "
            "O4'-C4' 1.453 0.012, O3'-C3' 1.423 0.014, C2'-O2' 1.413 0.013",
            "C5'-C4'-O4' 109.2 1.4, C5'-C4'-C3' 115.5 1.5, O4'-C4'-C3' 105.5 1.4, "
            "C1'-O4'-C4' 109.6 0.9, C4'-C3'-C2' 102.7 1.0, C3'-C2'-C1' 101.5 0.9, "
            "O4'-C1'-C2' 106.4 1.4, C4'-C3'-O3' 110.6 2.6, C2'-C3'-O3' 111.0 2.8, "
            "C1'-C2'-O2' 110.6 3.0, C3'-C2'-O2' 113.3 2.9, O4'-C1'-N 108.2 1.0, "
            "C2'-C1'-N 113.4 1.6",
            "C1' O4' C2' N positive, C3' C4' C2' O3' positive, C4' C5' O4' C3' negative, "
            "C2' C3' O2' C1' negative"),
    "DNA": ("C3':C:CH1 O3':O:OH1 C2':C:CH2 C1':C:CH1",
            "O5'-C5' 1.440 0.016, C5'-C4' 1.510 0.013, C4'-C3' 1.528 0.010, "
            "C3'-C2' 1.518 0.012, C2'-C1' 1.521 0.014, O4'-C1' 1.420 0.011, "
            "O4'-C4' 1.446 0.010, O3'-C3' 1.431 0.013",
            "C5'-C4'-O4' 109.4 1.0, C5'-C4'-C3' 114.7 1.5, O4'-C4'-C3' 106.0 1.0, "
            "C1'-O4'-C4' 110.1 1.0, C4'-C3'-C2' 103.2 1.0, C3'-C2'-C1' 102.5 1.2, "
            "O4'-C1'-C2' 106.0 1.0, C4'-C3'-O3' 110.3 2.5, C2'-C3'-O3' 110.6 2.5, "
            "O4'-C1'-N 108.3 1.0, C2'-C1'-N 114.3 1.4",
            "C1' O4' C2' N positive, C3' C4' C2' O3' positive, C4' C5' O4' C3' negative"),
}
# Bases (Clowney et al. 1996): atoms, bonds and angles (sigmas 0.010 Å and 1.0°), C1'-N first.
BASES = {
    "A": ("N9:N:NR5 C8:C:CR15 N7:N:NRD5 C5:C:CR56 C6:C:CR6 N6:N:NH2 N1:N:NRD6 C2:C:CR16 "
          "N3:N:NRD6 C4:C:CR56",
          "C1'-N9 1.462, N9-C8 1.373, C8-N7 1.311, N7-C5 1.388, C5-C6 1.406, C6-N6 1.335, "
          "C6-N1 1.351, N1-C2 1.339, C2-N3 1.331, N3-C4 1.344, C4-N9 1.374, C4-C5 1.383",
          "C1'-N9-C8 127.7, C1'-N9-C4 126.3, C8-N9-C4 105.8, N9-C8-N7 113.8, C8-N7-C5 103.9, "
          "N7-C5-C6 132.3, N7-C5-C4 110.7, C6-C5-C4 117.0, C5-C6-N6 123.7, C5-C6-N1 117.7, "
          "N6-C6-N1 118.6, C6-N1-C2 118.6, N1-C2-N3 129.3, C2-N3-C4 110.6, N3-C4-N9 127.4, "
          "N3-C4-C5 126.8, N9-C4-C5 105.8"),
    "G": ("N9:N:NR5 C8:C:CR15 N7:N:NRD5 C5:C:CR56 C6:C:CR6 O6:O:O N1:N:NR16 C2:C:CR6 "
          "N2:N:NH2 N3:N:NRD6 C4:C:CR56",
          "C1'-N9 1.459, N9-C8 1.374, C8-N7 1.305, N7-C5 1.389, C5-C6 1.419, C6-O6 1.237, "
          "C6-N1 1.391, N1-C2 1.373, C2-N2 1.341, C2-N3 1.323, N3-C4 1.350, C4-N9 1.375, "
          "C4-C5 1.379",
          "C1'-N9-C8 127.0, C1'-N9-C4 126.5, C8-N9-C4 106.4, N9-C8-N7 113.1, C8-N7-C5 104.3, "
          "N7-C5-C6 130.4, N7-C5-C4 110.8, C6-C5-C4 118.8, C5-C6-O6 128.6, C5-C6-N1 111.5, "
          "O6-C6-N1 119.9, C6-N1-C2 125.1, N1-C2-N2 116.2, N1-C2-N3 123.9, N2-C2-N3 119.9, "
          "C2-N3-C4 111.9, N3-C4-N9 126.0, N3-C4-C5 128.6, N9-C4-C5 105.4"),
    "C": ("N1:N:NR6 C2:C:CR6 O2:O:O N3:N:NRD6 C4:C:CR6 N4:N:NH2 C5:C:CR16 C6:C:CR16",
          "C1'-N1 1.470, N1-C2 1.397, C2-O2 1.240, C2-N3 1.353, N3-C4 1.335, C4-N4 1.335, "
          "C4-C5 1.425, C5-C6 1.339, C6-N1 1.367",
          "C1'-N1-C2 118.8, C1'-N1-C6 120.8, C6-N1-C2 120.3, N1-C2-O2 118.9, N1-C2-N3 119.2, "
          "O2-C2-N3 121.9, C2-N3-C4 119.9, N3-C4-N4 118.0, N3-C4-C5 121.9, N4-C4-C5 120.2, "
          "C4-C5-C6 117.4, C5-C6-N1 121.0"),
    "T": ("N1:N:NR6 C2:C:CR6 O2:O:O N3:N:NR16 C4:C:CR6 O4:O:O C5:C:CR6 C7:C:CH3 C6:C:CR16",
          "C1'-N1 1.473, N1-C2 1.376, C2-O2 1.220, C2-N3 1.373, N3-C4 1.382, C4-O4 1.228, "
          "C4-C5 1.445, C5-C7 1.496, C5-C6 1.339, C6-N1 1.378",
          "C1'-N1-C2 118.2, C1'-N1-C6 120.4, C6-N1-C2 121.3, N1-C2-O2 123.1, N1-C2-N3 114.6, "
          "O2-C2-N3 122.3, C2-N3-C4 127.2, N3-C4-O4 119.9, N3-C4-C5 115.2, O4-C4-C5 124.9, "
          "C4-C5-C7 119.0, C4-C5-C6 118.0, C7-C5-C6 122.9, C5-C6-N1 123.7"),
    "U": ("N1:N:NR6 C2:C:CR6 O2:O:O N3:N:NR16 C4:C:CR6 O4:O:O C5:C:CR16 C6:C:CR16",
          "C1'-N1 1.469, N1-C2 1.381, C2-O2 1.219, C2-N3 1.373, N3-C4 1.380, C4-O4 1.232, "
          "C4-C5 1.431, C5-C6 1.337, C6-N1 1.375",
          "C1'-N1-C2 117.7, C1'-N1-C6 121.2, C6-N1-C2 121.0, N1-C2-O2 122.8, N1-C2-N3 114.9, "
          "O2-C2-N3 122.2, C2-N3-C4 127.0, N3-C4-O4 119.4, N3-C4-C5 114.6, O4-C4-C5 125.9, "
          "C4-C5-C6 119.7, C5-C6-N1 122.7"),
}
NUCLEOTIDES = {"A": ("RNA", "A"), "C": ("RNA", "C"), "G": ("RNA", "G"), "U": ("RNA", "U"),
               "DA": ("DNA", "A"), "DC": ("DNA", "C"), "DG": ("DNA", "G"), "DT": ("DNA", "T")}

# Links.  Each atom is "side:name", side 1 = the first residue (the one before in a chain),
# 2 = the second.  Peptide (Engh & Huber 2001): two planes per link (C=O side and N side) so
# that omega can bend a little as observed; PTRANS/PCIS when residue 2 is proline.
# Phosphodiester "p" (Parkinson et al. 1996): no torsions, as the paper gives none.
# Disulfide "SS" (Engh & Huber 2001); chi3 of disulfides clusters at +-90 degrees.
C_N_CA = 121.7
# In a chain the N of residue 2 is planar with one H: 180 - (C-N-CA)/2.
PEPTIDE_H_ANGLE = round(180.0 - C_N_CA / 2.0, 2)
PEPTIDE_ANGLES = (f"1:CA-1:C-2:N 117.2 2.2, 1:O-1:C-2:N 122.7 1.6, 1:C-2:N-2:CA {C_N_CA} 2.5, "
                  f"1:C-2:N-2:H {PEPTIDE_H_ANGLE} {H_ANGLE_SIGMA}")
PRO_ANGLES = ("1:CA-1:C-2:N 117.1 2.8, 1:O-1:C-2:N 121.1 1.9, 1:C-2:N-2:CA 119.3 1.5, "
              "1:C-2:N-2:CD 125.0 2.1")
PEPTIDE_PLANES = "1:CA 1:C 1:O 2:N; 1:C 2:N 2:CA 2:H"
PRO_PLANES = "1:CA 1:C 1:O 2:N; 1:C 2:N 2:CA 2:CD"
OMEGA = "omega 1:CA-1:C-2:N-2:CA {} 5.0 1"
# id: (comp 1, mod 1, group 1, comp 2, mod 2, group 2, bonds, angles, torsions, planes)
LINKS = {
    "TRANS": (".", "DEL-OXT", "peptide", ".", "DEL-HN", "peptide", "1:C-2:N 1.336 0.023",
              PEPTIDE_ANGLES, OMEGA.format("180.0"), PEPTIDE_PLANES),
    "CIS": (".", "DEL-OXT", "peptide", ".", "DEL-HN", "peptide", "1:C-2:N 1.336 0.023",
            PEPTIDE_ANGLES, OMEGA.format("0.0"), PEPTIDE_PLANES),
    "PTRANS": (".", "DEL-OXT", "peptide", "PRO", "DEL-HNP", "peptide", "1:C-2:N 1.341 0.016",
               PRO_ANGLES, OMEGA.format("180.0"), PRO_PLANES),
    "PCIS": (".", "DEL-OXT", "peptide", "PRO", "DEL-HNP", "peptide", "1:C-2:N 1.341 0.016",
             PRO_ANGLES, OMEGA.format("0.0"), PRO_PLANES),
    "p": (".", "DEL-HO3", "DNA/RNA", ".", "DEL-OP3", "DNA/RNA", "1:O3'-2:P 1.607 0.012",
          "1:C3'-1:O3'-2:P 119.7 1.2, 1:O3'-2:P-2:O5' 104.0 1.9, 1:O3'-2:P-2:OP1 107.4 3.2, "
          "1:O3'-2:P-2:OP2 108.3 3.2", "", ""),
    "SS": ("CYS", "DEL-HG", "peptide", "CYS", "DEL-HG", "peptide", "1:SG-2:SG 2.033 0.016",
           "1:CB-1:SG-2:SG 104.2 2.1, 1:SG-2:SG-2:CB 104.2 2.1",
           "ss 1:CB-1:SG-2:SG-2:CB 90.0 10.0 2", ""),
}
# id: (name, group, atoms deleted, changed bonds "A-B electron esd nucleus esd", changed angles)
MODS = {"DEL-OXT": ("remove OXT of a linked residue", "peptide", "OXT", "", ""),
        "DEL-OP3": ("remove OP3 of a linked nucleotide", "DNA/RNA", "OP3", "", ""),
        "DEL-HN": ("amide N of a linked residue", "peptide", "H2 H3",
                   f"N-H {XH_DISTANCES[('N', 3)][0]} {XH_SIGMA} {XH_DISTANCES[('N', 3)][1]} "
                   f"{XH_SIGMA}", f"CA-N-H {PEPTIDE_H_ANGLE} {H_ANGLE_SIGMA}"),
        "DEL-HNP": ("imide N of a linked proline", "peptide", "H H2", "", ""),
        "DEL-HO3": ("remove HO3' of a linked nucleotide", "DNA/RNA", "HO3'", "", ""),
        "DEL-HG": ("remove HG of a disulfide-bonded cysteine", "peptide", "HG", "", "")}


def _items(text):
    return [t.split() for t in text.replace(",", "\n").splitlines() if t.strip()]


def _capped(sigma):
    return sigma if float(sigma) <= BOND_SIGMA_CAP else f"{BOND_SIGMA_CAP:.3f}"


def _cif(value):
    text = str(value)
    return f'"{text}"' if "'" in text else text


def _loop(tag, columns, rows):
    lines = ["loop_"] + [f"_{tag}.{c}" for c in columns]
    lines += [" ".join(_cif(x) for x in r) for r in rows]
    return "\n".join(lines) + "\n"


def _monomer(name, atoms, bonds, angles, chirals, planes, group="L-peptide", hydrogens=""):
    if isinstance(planes, str):
        planes = [planes]
    n_heavy = len(atoms.split())
    if hydrogens:
        h_atoms, h_bonds, h_angles, planes = hydrogen_terms(atoms, bonds, angles, planes,
                                                            hydrogens)
        atoms, angles = f"{atoms} {h_atoms}", f"{angles}, {h_angles}" if angles else h_angles
        bonds = f"{bonds}, {h_bonds}" if bonds else h_bonds
    atom_rows = [(name, *a.split(":"), 0) for a in atoms.split()]
    out = [f"data_comp_{name}\n",
           _loop("chem_comp_atom", ["comp_id", "atom_id", "type_symbol", "type_energy",
                                    "partial_charge"], atom_rows)]
    if bonds:
        # Heavy-atom bonds: one distance for electron cloud and nucleus alike.
        rows = [(name, *b.split("-"), "single", v, e, *(rest or (v, e)))
                for b, v, e, *rest in _items(bonds)]
        rows = [(*r[:5], _capped(r[5]), r[6], _capped(r[7])) for r in rows]
        out.append(_loop("chem_comp_bond", ["comp_id", "atom_id_1", "atom_id_2", "type",
                                            "value_dist", "value_dist_esd",
                                            "value_dist_nucleus", "value_dist_nucleus_esd"],
                         rows))
    if angles:
        rows = [(name, *a.split("-"), v, e) for a, v, e in _items(angles)]
        out.append(_loop("chem_comp_angle", ["comp_id", "atom_id_1", "atom_id_2", "atom_id_3",
                                             "value_angle", "value_angle_esd"], rows))
    if chirals:
        rows = [(name, f"chir_{k + 1}", *c) for k, c in enumerate(_items(chirals))]
        out.append(_loop("chem_comp_chir", ["comp_id", "id", "atom_id_centre", "atom_id_1",
                                            "atom_id_2", "atom_id_3", "volume_sign"], rows))
    plane_rows = [(name, f"plan-{k + 1}", a, 0.020)
                  for k, p in enumerate(x for x in planes if x) for a in p.split()]
    if plane_rows:
        out.append(_loop("chem_comp_plane_atom", ["comp_id", "plane_id", "atom_id",
                                                  "dist_esd"], plane_rows))
    header = _loop("chem_comp", ["id", "three_letter_code", "name", "group",
                                 "number_atoms_all", "number_atoms_nh", "desc_level"],
                   [(name, name, name, group, len(atom_rows), n_heavy, ".")])
    return "global_\ndata_comp_list\n" + header + "\n" + "\n".join(out)


def amino_acid(name):
    if name == "GLY":
        return _monomer(name, *GLY, hydrogens=HYDROGENS["GLY"])
    if name == "PRO":
        return _monomer(name, *PRO, group="P-peptide", hydrogens=HYDROGENS["PRO"])
    atoms, bonds, angles, chirals, plane = RESIDUES[name]
    own = {a[0] for a in _items(angles)}
    cb = ", ".join(a for a in CB_ANGLES.split(", ") if a.split()[0] not in own)
    backbone = ", ".join(a for a in BACKBONE_ANGLES.split(", ") if a.split()[0] not in own)
    all_angles = ", ".join(x for x in (backbone, cb, angles) if x)
    chir = "CA N C CB positive" + (", " + chirals if chirals else "")
    return _monomer(name, f"{BACKBONE_ATOMS} {atoms}", f"{BACKBONE_BONDS}, {bonds}",
                    all_angles, chir, ["CA C O OXT", plane],
                    hydrogens=f"{BACKBONE_H} {HYDROGENS[name]}")


def _split(spec):
    """"1:CA-1:C-2:N" -> [("1", "CA"), ("1", "C"), ("2", "N")]."""
    return [tuple(a.split(":")) for a in spec.split("-")]


def _link_block(link_id, bonds, angles, torsions, planes):
    out = [f"data_link_{link_id}\n"]
    rows = [(link_id, *_split(b)[0], *_split(b)[1], "single", v, e) for b, v, e in _items(bonds)]
    out.append(_loop("chem_link_bond", ["link_id", "atom_1_comp_id", "atom_id_1",
                                        "atom_2_comp_id", "atom_id_2", "type", "value_dist",
                                        "value_dist_esd"], rows))
    rows = [(link_id, *[x for atom in _split(a) for x in atom], v, e)
            for a, v, e in _items(angles)]
    out.append(_loop("chem_link_angle", ["link_id", "atom_1_comp_id", "atom_id_1",
                                         "atom_2_comp_id", "atom_id_2", "atom_3_comp_id",
                                         "atom_id_3", "value_angle", "value_angle_esd"], rows))
    if torsions:
        rows = [(link_id, name, *[x for atom in _split(t) for x in atom], v, e, period)
                for name, t, v, e, period in _items(torsions)]
        out.append(_loop("chem_link_tor", ["link_id", "id", "atom_1_comp_id", "atom_id_1",
                                           "atom_2_comp_id", "atom_id_2", "atom_3_comp_id",
                                           "atom_id_3", "atom_4_comp_id", "atom_id_4",
                                           "value_angle", "value_angle_esd", "period"], rows))
    if planes:
        rows = [(link_id, f"plan-{p + 1}", *atom.split(":"), 0.020)
                for p, members in enumerate(planes.split(";")) for atom in members.split()]
        out.append(_loop("chem_link_plane", ["link_id", "plane_id", "atom_comp_id", "atom_id",
                                             "dist_esd"], rows))
    return "\n".join(out)


def library_list():
    links = _loop("chem_link", ["id", "comp_id_1", "mod_id_1", "group_comp_1", "comp_id_2",
                                "mod_id_2", "group_comp_2", "name"],
                  [(k, *v[:6], k) for k, v in LINKS.items()])
    mods = _loop("chem_mod", ["id", "name", "comp_id", "group_id"],
                 [(k, f"'{m[0]}'", ".", m[1]) for k, m in MODS.items()])
    blocks = ["global_\ndata_link_list\n" + links, "data_mod_list\n" + mods]
    for k, (_, _, deleted, bonds, angles) in MODS.items():
        block = [_loop("chem_mod_atom", ["mod_id", "function", "atom_id", "new_atom_id",
                                         "new_type_symbol", "new_type_energy",
                                         "new_partial_charge"],
                       [(k, "delete", a, ".", ".", ".", ".") for a in deleted.split()])]
        if bonds:
            block.append(_loop("chem_mod_bond", ["mod_id", "function", "atom_id_1", "atom_id_2",
                                                 "new_type", "new_value_dist",
                                                 "new_value_dist_esd", "new_value_dist_nucleus",
                                                 "new_value_dist_nucleus_esd"],
                               [(k, "change", *b.split("-"), "single", *rest)
                                for b, *rest in _items(bonds)]))
        if angles:
            block.append(_loop("chem_mod_angle", ["mod_id", "function", "atom_id_1",
                                                  "atom_id_2", "atom_id_3", "new_value_angle",
                                                  "new_value_angle_esd"],
                               [(k, "change", *a.split("-"), v, e)
                                for a, v, e in _items(angles)]))
        blocks.append(f"data_mod_{k}\n\n" + "\n".join(block))
    blocks += [_link_block(k, *v[6:]) for k, v in LINKS.items()]
    return "\n".join(blocks)


def nucleotide(name):
    kind, base = NUCLEOTIDES[name]
    n = "N9" if base in "AG" else "N1"
    sugar_atoms, sugar_bonds, sugar_angles, chirals = SUGARS[kind]
    base_atoms, base_bonds, base_angles = BASES[base]
    bonds = ", ".join(f"{b} 0.010" for b in base_bonds.split(", "))
    angles = ", ".join(f"{a} 1.0" for a in base_angles.split(", "))
    plane = "C1' " + " ".join(a.split(":")[0] for a in base_atoms.split())
    return _monomer(name, f"{PHOSPHATE_ATOMS} {sugar_atoms} {base_atoms}",
                    f"{PHOSPHATE_BONDS}, {sugar_bonds}, {bonds}",
                    f"{PHOSPHATE_ANGLES}, {sugar_angles.replace('-N ', f'-{n} ')}, {angles}",
                    chirals.replace(" N ", f" {n} "), [plane], group=kind,
                    hydrogens=f"{HYDROGENS[kind]} {HYDROGENS[base]}")


ENERGY_TYPES = sorted({"NH1", "CH1", "C", "O", "OC", "CH2", "CH3", "OH1", "SH1", "S2", "SE",
                       "NH2", "NT3", "C5", "NR5", "CR15", "CR6", "CR16", "CR56", "NR15", "N",
                       "P", "OP", "O2", "NRD5", "NRD6", "NR16", "NR6", "OH2", "H"})


def ener_lib():
    def element(t):
        return "SE" if t == "SE" else t[0]
    rows = [(t, ".", element(t), ".", ".", ".", ".", ".") for t in ENERGY_TYPES]
    rows += [(el, ".", el, ".", ".", ".", ".", ".") for el in sorted(set(IONS.values()))]
    return "global_\ndata_energy\n" + _loop(
        "lib_atom", ["type", "hb_type", "element", "vdw_radius", "vdwh_radius", "ion_radius",
                     "valency", "sp"], rows)


def readme():
    sources = __doc__.split("Run from the repository root")[0].split("\n\n", 1)[1].strip()
    return ("# Built-in restraint dictionary\n\nGenerated by `tools/make_builtin_dictionary.py`; "
            "edit the tables there, not these files.\n\n" + sources + "\n")


def write(out=OUT):
    (out / "list").mkdir(parents=True, exist_ok=True)
    (out / "README.md").write_text(readme())
    (out / "list" / "mon_lib_list.cif").write_text(library_list())
    (out / "ener_lib.cif").write_text(ener_lib())
    names = list(RESIDUES) + ["GLY", "PRO"]
    for name in names:
        _write_monomer(out, name, amino_acid(name))
    for name in NUCLEOTIDES:
        _write_monomer(out, name, nucleotide(name))
    _write_monomer(out, "HOH", _monomer("HOH", "O:O:OH2", "", "", "", [], group="non-polymer",
                                        hydrogens=HYDROGENS["HOH"]))
    for name, el in IONS.items():
        _write_monomer(out, name, _monomer(name, f"{el}:{el}:{el}", "", "", "", [],
                                           group="non-polymer"))


def _write_monomer(out, name, text):
    d = out / name[0].lower()
    d.mkdir(exist_ok=True)
    (d / f"{name}.cif").write_text(text)


if __name__ == "__main__":
    write()
    print(f"written to {OUT}")
