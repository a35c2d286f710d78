"""Ankle phantom: 11 labelled bones/tendons/ligaments and 4 transfer abnormalities on PD-FS.

Root frame (mm): origin at the top of the talar dome, x medial, y posterior, z superior (a right ankle maps to LPS
as is; a left ankle is mirrored). The foot carries its own frame (talus, calcaneus, navicular) so plantar/dorsal
flexion moves it relative to the leg (tibia, fibula).

Lesions:

* atfl_tear / cfl_tear: fluid-filled gap in the thin dark ligament with oedema in the lateral gutter (complete) or
  a thickened ligament of intermediate signal with surrounding oedema (partial); small (ligaments are 2-3 mm).
* achilles_rupture: fluid/haemorrhage gap 2-6 cm above the insertion between thickened, oedematous stumps
  (complete) or a fusiform thickened segment of intermediate signal around an intrasubstance fluid cleft
  (1.2-2.4 mm thick, 10-25 mm long) (partial).
* osteochondral_lesion_talus: focal cartilage defect of the medial or lateral talar dome filled with fluid, a
  subchondral fluid-signal fragment line and surrounding marrow oedema (3-12 mm).
"""
from __future__ import annotations

from typing import Dict, List

import numpy as np

from orthonet.synthetic.intensities import Bone, Layered, Rimmed
from orthonet.synthetic.joints import CaseRandom, JointModel, ViewLayout, register
from orthonet.synthetic.phantom import Phantom, Structure, apply, case_transform, rigid, rot_x
from orthonet.synthetic.shapes import (Capsule, Ellipsoid, EllipticCylinder, Intersect, Offset, Shell, Sphere,
                                       SuperEllipsoid, Transformed, Union, band, polyline)

LABELS = ("tibia", "fibula", "talus", "calcaneus", "navicular", "talar_cartilage", "achilles_tendon", "atfl", "cfl",
          "peroneal_tendons", "tibialis_posterior_tendon")
DIAGNOSES = ("atfl_tear", "cfl_tear", "achilles_rupture", "osteochondral_lesion_talus")
PREVALENCE = {"atfl_tear": 0.42, "cfl_tear": 0.3, "achilles_rupture": 0.3, "osteochondral_lesion_talus": 0.33}
L = {name: i + 1 for i, name in enumerate(LABELS)}
VIEW_CENTER = (0.0, 6.0, -10.0)


def build(rngs: CaseRandom, present: Dict[str, bool]) -> Phantom:
    """One ankle exam's phantom."""
    rng = rngs.stream("anatomy")
    scale = float(rng.uniform(0.88, 1.12))
    left = bool(rng.random() < 0.5)
    plantar = float(rng.uniform(-5.0, 20.0))          # plantar flexion of the foot in the coil
    angles = rng.normal(0.0, 3.0, 3)
    angles[2] += rng.uniform(-8.0, 8.0)
    position = np.array([90.0 if left else -90.0, 10.0, -900.0]) + rng.uniform(-15.0, 15.0, 3)
    fat = float(rng.uniform(3.0, 9.0))
    t_cart = float(rng.uniform(1.2, 1.9))
    achilles_t = float(rng.uniform(2.6, 3.4))
    fluid = float(rng.uniform(0.3, 1.2))
    foot_f = rigid(rot_x(plantar), pivot=(0.0, 2.0, -12.0))
    frames = {"root": np.eye(4), "foot": foot_f}
    foot = lambda p: apply(foot_f, p)   # noqa: E731
    lesion_rng = {name: rngs.stream(f"lesion:{name}") for name in DIAGNOSES}
    s: List[Structure] = []
    sites: Dict[str, np.ndarray] = {}

    # ---- envelope and muscles --------------------------------------------------------------------------------
    leg = EllipticCylinder((0.0, 10.0), (34.0 + fat, 36.0 + fat), -30.0, 400.0)
    foot_env = Transformed(Union([SuperEllipsoid((-3.0, -30.0, -34.0), (34.0 + fat, 75.0, 24.0 + fat)),
                                  Ellipsoid((-2.0, 40.0, -38.0), (26.0 + fat, 24.0 + fat, 24.0 + fat))], k=15.0),
                           foot_f)
    s.append(Structure("skin_and_fat", Union([leg, foot_env], k=18.0), Rimmed("skin", "fat", 1.4)))
    for name, shape in [("soleus", Ellipsoid((0.0, 30.0, 150.0), (30.0, 15.0, 110.0))),
                        ("flexor_hallucis_longus", Ellipsoid((-4.0, 20.0, 60.0), (11.0, 9.0, 55.0))),
                        ("peroneus", Ellipsoid((-27.0, 12.0, 120.0), (9.0, 10.0, 80.0))),
                        ("tibialis_anterior", Ellipsoid((-10.0, -20.0, 150.0), (10.0, 10.0, 100.0)))]:
        s.append(Structure(name, shape, "muscle"))
    s.append(Structure("abductor_hallucis", Transformed(Ellipsoid((22.0, -5.0, -45.0), (9.0, 40.0, 10.0)), foot_f),
                       "muscle"))
    s.append(Structure("flexor_digitorum_brevis", Transformed(Ellipsoid((0.0, -10.0, -58.0), (16.0, 45.0, 7.0)),
                                                               foot_f), "muscle"))

    # ---- joint fluid -------------------------------------------------------------------------------------------
    s.append(Structure("joint_fluid", Union([Ellipsoid((0.0, -16.0, 2.0), (16.0, 2.0 + fluid, 4.0 + fluid)),
                                             Ellipsoid((0.0, 20.0, 0.0), (14.0, 1.5 + fluid, 3.0 + fluid))]),
                       "fluid"))

    # ---- lateral ligaments -----------------------------------------------------------------------------------
    atfl_a, atfl_b = np.array([-22.0, -6.0, -10.0]), foot((-13.0, -24.0, -15.0))
    cfl_a, cfl_b = np.array([-24.0, 6.0, -20.0]), foot((-18.0, 20.0, -38.0))
    _ligament(s, sites, "atfl_tear", "atfl", band(atfl_a, atfl_b, (0, 0, 1), 4.0, 1.2), atfl_a, atfl_b,
              lesion_rng["atfl_tear"], present["atfl_tear"], flat=True)
    _ligament(s, sites, "cfl_tear", "cfl", Capsule(cfl_a, cfl_b, 2.2), cfl_a, cfl_b, lesion_rng["cfl_tear"],
              present["cfl_tear"], flat=False)
    s.append(Structure("deltoid_ligament", band((18.0, 2.0, -8.0), foot((14.0, 4.0, -26.0)), (0, 1, 0), 7.0, 2.0),
                       "ligament"))

    # ---- tendons ---------------------------------------------------------------------------------------------
    r = lesion_rng["achilles_rupture"]
    complete = bool(r.random() < 0.7)
    level, gap = float(r.uniform(20.0, 50.0)), float(r.uniform(8.0, 30.0))
    cleft = (float(r.uniform(10.0, 25.0)), float(r.uniform(1.2, 2.4)), float(r.uniform(3.5, 6.0)))
    partial_seg, partial_swell = float(r.uniform(6.0, 12.0)), float(r.uniform(1.3, 1.6))
    insertion = foot((0.0, 52.0, -36.0))
    top = np.array([0.0, 44.0, 160.0])
    ach = band(top, insertion, (1, 0, 0), 7.5, achilles_t)
    axis = (top - insertion) / np.linalg.norm(top - insertion)
    site = insertion + axis * (level + 10.0)
    sites["achilles_rupture"] = site
    ruptured = present["achilles_rupture"]
    if ruptured and complete:
        stumps = band(site - axis * (gap / 2 + 15), site + axis * (gap / 2 + 15), (1, 0, 0), 7.5, achilles_t)
        s.append(Structure("achilles_stumps_edema", Offset(stumps, 3.0), "edema", soft_mm=2.5, opacity=0.8))
        ach = band(top, insertion, (1, 0, 0), 8.5, achilles_t * 1.6)
    s.append(Structure("achilles_tendon", ach, "torn_fibres" if ruptured and complete else "tendon",
                       label=L["achilles_tendon"]))
    if ruptured:
        if complete:
            s.append(Structure("achilles_gap", band(site - axis * gap / 2, site + axis * gap / 2, (1, 0, 0), 9.5,
                                                    achilles_t * 2.0), "fluid", label=0, soft_mm=1.5, opacity=0.85))
        else:
            # partial (intrasubstance) tear: fusiform swelling of intermediate signal with a fluid cleft inside
            length, width, half_w = cleft
            half = length / 2 + partial_seg
            s.append(Structure("achilles_partial_tendinosis", band(site - axis * half, site + axis * half, (1, 0, 0),
                                                                   8.0, achilles_t * partial_swell),
                               "tendinosis", label=L["achilles_tendon"], soft_mm=1.0))
            s.append(Structure("achilles_partial", band(site - axis * length / 2, site + axis * length / 2, (1, 0, 0),
                                                        half_w, width / 2.0), "fluid", opacity=0.9))
    s.append(Structure("peroneal_tendons", Union([
        polyline([(-22.0, 17.0, 80.0), (-27.0, 13.0, -5.0), foot((-26.0, 4.0, -30.0)), foot((-21.0, -40.0, -40.0))],
                 2.6, k=1.0),
        polyline([(-25.0, 19.0, 80.0), (-30.0, 15.0, -5.0), foot((-29.0, 7.0, -30.0)), foot((-24.0, -38.0, -42.0))],
                 2.6, k=1.0)]), "tendon", label=L["peroneal_tendons"]))
    s.append(Structure("tibialis_posterior_tendon",
                       polyline([(10.0, 14.0, 80.0), (19.0, 10.0, 5.0), foot((21.0, 2.0, -16.0)),
                                 foot((12.0, -40.0, -22.0))], 3.0, k=1.0), "tendon",
                       label=L["tibialis_posterior_tendon"]))
    fhl = [(3.0, 21.0, 60.0), (6.0, 18.0, -5.0), foot((10.0, 4.0, -36.0)), foot((8.0, -60.0, -48.0))]
    s.append(Structure("flexor_hallucis_tendon", polyline(fhl, 2.4, k=1.0), "tendon"))
    s.append(Structure("tibialis_anterior_tendon", polyline([(8.0, -24.0, 80.0), (10.0, -29.0, 5.0),
                                                             foot((14.0, -46.0, -22.0))], 3.0, k=1.0), "tendon"))

    # ---- bones -----------------------------------------------------------------------------------------------
    plafond = SuperEllipsoid((0.0, 1.0, 9.0), (20.0, 17.0, 7.0))
    tibia = Union([Union([plafond, Ellipsoid((0.0, 0.0, 22.0), (23.0, 20.0, 20.0)),
                          Capsule((17.0, 2.0, 8.0), (19.0, 3.0, -10.0), 7.0, 5.5)], k=6.0),
                   Capsule((0.0, 2.0, 30.0), (0.0, 2.0, 320.0), 13.5, 12.0)], k=14.0)
    fibula = Union([Capsule((-24.0, 8.0, 320.0), (-24.0, 5.0, 15.0), 8.0, 9.0),
                    Ellipsoid((-25.0, 4.0, -1.0), (8.0, 11.0, 19.0))], k=6.0)
    talus_body = Union([SuperEllipsoid((0.0, 2.0, -12.0), (15.0, 17.0, 10.0)),
                        Ellipsoid((0.0, 2.0, -11.0), (14.5, 19.0, 11.0))], k=3.0)
    talus = Union([talus_body, Ellipsoid((2.0, -22.0, -16.0), (11.0, 12.0, 9.0)), Sphere((3.0, -31.0, -17.0), 10.0),
                   Ellipsoid((-13.0, 4.0, -18.0), (5.0, 8.0, 6.0))], k=5.0)
    calcaneus = Union([SuperEllipsoid((-2.0, 16.0, -38.0), (15.0, 30.0, 12.0), rotation=rot_x(-18.0)),
                       Ellipsoid((0.0, 42.0, -40.0), (15.0, 12.0, 17.0)),
                       Ellipsoid((13.0, 6.0, -28.0), (8.0, 9.0, 4.0))], k=6.0)
    navicular = Ellipsoid((5.0, -47.0, -16.0), (14.0, 6.0, 11.0))
    cuboid = SuperEllipsoid((-14.0, -58.0, -33.0), (10.0, 11.0, 10.0))
    s.append(Structure("tibia", tibia, Bone(1.5), label=L["tibia"]))
    s.append(Structure("fibula", fibula, Bone(1.3), label=L["fibula"]))
    s.append(Structure("talus", talus, Bone(1.0), label=L["talus"], frame="foot"))
    s.append(Structure("calcaneus", calcaneus, Bone(1.0), label=L["calcaneus"], frame="foot"))
    s.append(Structure("navicular", navicular, Bone(1.0), label=L["navicular"], frame="foot"))
    s.append(Structure("cuboid", cuboid, Bone(1.0), frame="foot"))
    s.append(Structure("tibial_plafond_cartilage", Intersect(Shell(plafond, 0.0, t_cart), Ellipsoid(
        (0.0, 1.0, 0.0), (18.0, 17.0, 4.0)), k=0.5), Layered(depth_mm=t_cart * 0.4)))

    # ---- talar dome cartilage and osteochondral lesion ----------------------------------------------------------
    dome = Ellipsoid((0.0, 2.0, -3.0), (17.0, 20.0, 8.0))
    s.append(Structure("talar_cartilage", Intersect(Shell(talus_body, 0.0, t_cart), dome, k=0.5),
                       Layered(depth_mm=t_cart * 0.4), label=L["talar_cartilage"], frame="foot"))
    r = lesion_rng["osteochondral_lesion_talus"]
    medial = bool(r.random() < 0.6)
    size = float(r.uniform(3.0, 12.0))
    p_off = float(r.uniform(-8.0, 8.0))
    edema_r = size * float(r.uniform(1.2, 2.0))
    centre = np.array([(8.0 if medial else -8.0), 2.0 + p_off, 0.0])
    sites["osteochondral_lesion_talus"] = foot(centre + [0.0, 0.0, -size / 3.0])
    if present["osteochondral_lesion_talus"]:
        s.append(Structure("olt_marrow_edema", Intersect(Ellipsoid(centre + [0.0, 0.0, -size / 2.0],
                                                                   (edema_r, edema_r, edema_r * 0.9)),
                                                         Offset(talus_body, -0.8)),
                           "bone_bruise", frame="foot", soft_mm=2.5))
        fragment = Shell(Sphere(centre + [0.0, 0.0, 0.5], size * 0.55), 0.0, 0.9)
        s.append(Structure("olt_fragment_line", Intersect(fragment, Offset(talus_body, -0.5)), "fluid", frame="foot",
                           opacity=0.9))
        s.append(Structure("olt_cartilage_defect", Intersect(Sphere(centre + [0.0, 0.0, 1.0], size * 0.4),
                                                             Offset(talus_body, t_cart)),
                           "fluid", label=0, frame="foot", opacity=0.9))

    to_patient = case_transform(scale, left, angles, position)
    return Phantom("ankle", s, frames, to_patient, scale, dict(present), sites,
                   params={"scale": scale, "left": left, "plantar_flexion_deg": plantar, "fat_mm": fat,
                           "angles_deg": angles.tolist()})


def _ligament(s: List[Structure], sites: Dict[str, np.ndarray], lesion: str, label_name: str, shape, a, b,
              rng: np.random.Generator, injured: bool, flat: bool) -> None:
    """A thin ankle ligament; a tear is a fluid gap with lateral-gutter oedema (complete) or a thickened,
    intermediate-signal ligament with oedema around it (partial)."""
    complete = bool(rng.random() < 0.6)
    where = float(rng.uniform(0.3, 0.7))
    gap = float(rng.uniform(2.5, 6.0))
    edema = float(rng.uniform(2.0, 5.0))
    a, b = np.asarray(a, float), np.asarray(b, float)
    c = a + where * (b - a)
    d = (b - a) / np.linalg.norm(b - a)
    sites[lesion] = c
    if injured:
        s.append(Structure(f"{lesion}_edema", Offset(shape, edema), "edema", soft_mm=2.0, opacity=0.8))
        shape = Offset(shape, 0.8) if not complete else shape
    s.append(Structure(label_name, shape, "torn_fibres" if injured else "ligament", label=L[label_name]))
    if injured and complete:
        s.append(Structure(f"{lesion}_gap", Capsule(c - d * gap / 2, c + d * gap / 2, 3.0 if flat else 3.2),
                           "fluid", label=0, soft_mm=0.8, opacity=0.9))


MODEL = register(JointModel(
    name="ankle", dataset_name="Ankle", labels=LABELS, diagnoses=DIAGNOSES, prevalence=PREVALENCE,
    views={"sagittal": ViewLayout((150.0, 150.0), 90.0),
           "coronal": ViewLayout((140.0, 150.0), 110.0, spacing_scale=(0.95, 1.0)),
           "axial": ViewLayout((140.0, 150.0), 130.0, spacing_scale=(1.0, 1.15))},
    build=build, view_center=VIEW_CENTER,
    description="Synthetic ankle MRI, PD-FS sagittal/coronal/axial stacks; 11 structures, 4 abnormalities"))
