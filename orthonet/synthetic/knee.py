"""Knee phantom: 11 labelled structures and 8 abnormalities as they appear on sagittal/coronal/axial PD-FS.

Root frame (mm): origin at the centre of the tibial plateau, x medial, y posterior, z superior (a right knee maps
to LPS as is; a left knee is mirrored). The femur and patella carry their own frames so flexion and patellar
dislocation move them rigidly. Landmark numbers are adult averages; each case scales and jitters them.

Lesions (each independent, drawn with its prevalence; sizes vary and some are only a few mm):

* acl_tear / pcl_tear: complete tear = fluid-filled fibre gap with oedematous stumps; partial / interstitial =
  a focally thickened ACL segment (12-26 mm) of intermediate signal around an intrasubstance fluid cleft (6-14 mm
  long, 2-3.6 mm wide) with periligamentous oedema, or a thickened PCL of intermediate signal with an interstitial
  fluid blot.
* medial/lateral_meniscus_tear: a linear fluid cleft 1.2-2.5 mm thick inside the dark wedge, reaching the
  articular surface: horizontal-oblique (8-18 mm long) or radial (from the free edge across 85-100 % of the
  width), in a 1.5-2.5 mm rim of intermediate (mucoid degeneration) signal.
* mcl_injury / lcl_injury: thickened ligament with intermediate signal, bright oedema around it; grade 3 adds a gap.
* patellar_dislocation: laterally displaced and tilted patella, bone-bruise marrow oedema on the medial patellar
  facet and the lateral femoral condyle, oedema at the torn medial retinaculum.
* joint_effusion: distended bright suprapatellar recess, gutters and posterior recesses (physiologic fluid is a
  thin sliver in normal knees).
"""
from __future__ import annotations

from typing import Dict, List

import numpy as np

from orthonet.synthetic.intensities import Bone, Layered, Rimmed, Striated, Tissue, Waves
from orthonet.synthetic.joints import CaseRandom, JointModel, ViewLayout, register
from orthonet.synthetic.phantom import Phantom, Structure, apply, case_transform, rigid, rot_x, rot_y, rot_z
from orthonet.synthetic.shapes import (Box, Capsule, EllipticCylinder, Ellipsoid, HalfSpace, Intersect, Offset,
                                       Shell, Subtract, SuperEllipsoid, Transformed, Union, Wedge, band, polyline)

LABELS = ("femur", "tibia", "fibula", "patella", "femoral_cartilage", "tibial_cartilage", "patellar_cartilage",
          "medial_meniscus", "lateral_meniscus", "acl", "pcl")
DIAGNOSES = ("acl_tear", "pcl_tear", "medial_meniscus_tear", "lateral_meniscus_tear", "mcl_injury", "lcl_injury",
             "patellar_dislocation", "joint_effusion")
PREVALENCE = {"acl_tear": 0.4, "pcl_tear": 0.3, "medial_meniscus_tear": 0.42, "lateral_meniscus_tear": 0.32,
              "mcl_injury": 0.35, "lcl_injury": 0.28, "patellar_dislocation": 0.27, "joint_effusion": 0.4}
L = {name: i + 1 for i, name in enumerate(LABELS)}
VIEW_CENTER = (0.0, 6.0, 12.0)   # root-frame point the technologist centres the stacks on


def _femur_shapes(rng: np.random.Generator) -> Dict[str, object]:
    """Distal femur in its own frame: two condyles, trochlea with groove, notch, metaphysis and shaft."""
    j = lambda: float(rng.uniform(0.95, 1.05))  # noqa: E731
    cond_med = Ellipsoid((21.0, 6.0, 27.0), (14.5 * j(), 23.5 * j(), 22.0))
    cond_lat = Ellipsoid((-21.0, 4.0, 27.0), (14.0 * j(), 22.5 * j(), 22.0))
    trochlea = SuperEllipsoid((0.0, -6.0, 35.0), (34.0, 20.0, 24.0))
    groove = Capsule((0.0, -31.0, 18.0), (0.0, -30.0, 62.0), 8.0)
    notch = Ellipsoid((0.0, 18.0, 10.0), (9.5, 26.0, 22.0))
    distal = Subtract(Subtract(Union([cond_med, cond_lat, trochlea], k=6.0), groove, k=3.0), notch, k=2.5)
    metaphysis = Ellipsoid((0.0, 0.0, 58.0), (33.0, 22.0, 28.0))
    shaft = Capsule((0.0, 3.0, 62.0), (0.0, 4.0, 320.0), 15.0, 14.0)
    upper = Union([metaphysis, shaft], k=12.0)
    bone = Subtract(Union([distal, upper], k=8.0), notch, k=2.5)
    return {"bone": bone, "distal": distal, "notch": notch, "cond_med": cond_med, "cond_lat": cond_lat}


def _tibia_shapes(slope_deg: float) -> Dict[str, object]:
    """Proximal tibia: flat plateau (posterior slope), flaring metaphysis, spines, tuberosity, shaft."""
    plateau = SuperEllipsoid((0.0, 3.0, -9.0), (38.0, 26.0, 9.0), rotation=rot_x(-slope_deg))
    metaphysis = Ellipsoid((0.0, 3.5, -26.0), (34.0, 26.0, 22.0))
    shaft = Capsule((0.0, 6.0, -40.0), (0.0, 9.0, -320.0), 14.0, 12.0)
    spine_m = Ellipsoid((5.0, 2.0, -1.0), (3.5, 7.0, 6.0))
    spine_l = Ellipsoid((-5.0, 2.0, -1.0), (3.5, 7.0, 5.5))
    tuberosity = Ellipsoid((0.0, -16.0, -30.0), (12.0, 9.0, 13.0))
    head = Union([plateau, metaphysis], k=12.0)
    bone = Union([head, spine_m, spine_l, tuberosity], k=4.0)
    bone = Union([bone, shaft], k=20.0)
    return {"bone": bone, "plateau": plateau}


def build(rngs: CaseRandom, present: Dict[str, bool]) -> Phantom:
    """One knee exam's phantom. ``present`` says which of DIAGNOSES are in this knee."""
    rng = rngs.stream("anatomy")
    scale = float(rng.uniform(0.88, 1.12))
    left = bool(rng.random() < 0.5)
    flexion = float(rng.uniform(0.0, 25.0))
    angles = rng.normal(0.0, 3.0, 3)
    angles[2] += rng.uniform(-10.0, 10.0)          # leg external/internal rotation in the coil
    position = np.array([100.0 if left else -100.0, -20.0, -480.0]) + rng.uniform(-15.0, 15.0, 3)
    fat = float(rng.uniform(5.0, 16.0))
    slope = float(rng.uniform(3.0, 10.0))
    patella_height = float(rng.uniform(-5.0, 6.0))
    t_fem, t_tib, t_pat = (float(rng.uniform(2.0, 2.8)), float(rng.uniform(1.8, 2.5)), float(rng.uniform(2.8, 3.8)))
    menisc_h = float(rng.uniform(7.0, 9.0))
    normal_fluid = float(rng.uniform(0.3, 1.6))
    muscle = float(rng.uniform(0.88, 1.12))
    femur_parts = _femur_shapes(rng)
    tibia_parts = _tibia_shapes(slope)

    # ---- frames: femur flexes about the condylar axis; it is lifted so the condyles keep touching the tibia
    b, a = 22.0, 23.5
    th = np.deg2rad(flexion)
    lift = float(np.sqrt((a * np.sin(th)) ** 2 + (b * np.cos(th)) ** 2) - b) * 0.6
    femur_f = rigid(rot_x(-flexion), translation=(0.0, 0.0, lift), pivot=(0.0, 4.0, 27.0))
    patella_in_femur = rigid(rot_x(0.7 * flexion), pivot=(0.0, 4.0, 27.0)) @ rigid(
        translation=(0.0, -26.0 - t_fem - t_pat - 6.3, 40.0 + patella_height))
    lesion_rng = {name: rngs.stream(f"lesion:{name}") for name in DIAGNOSES}

    # patellar dislocation moves the patella before anything attaches to it
    r = lesion_rng["patellar_dislocation"]
    disl_shift, disl_tilt = float(r.uniform(10.0, 22.0)), float(r.uniform(12.0, 30.0))
    bruise_pat_r, bruise_fem_r = float(r.uniform(5.0, 10.0)), float(r.uniform(7.0, 14.0))
    retinac_r = float(r.uniform(6.0, 12.0))
    if present["patellar_dislocation"]:
        patella_in_femur = patella_in_femur @ rigid(rot_z(-disl_tilt), translation=(-disl_shift, -2.0, -3.0))
    patella_f = femur_f @ patella_in_femur
    frames = {"root": np.eye(4), "femur": femur_f, "patella": patella_f}
    fem = lambda p: apply(femur_f, p)      # noqa: E731  femur-frame point -> root
    pat = lambda p: apply(patella_f, p)    # noqa: E731

    s: List[Structure] = []
    sites: Dict[str, np.ndarray] = {}

    # ---- envelope: skin, subcutaneous fat ----------------------------------------------------------------
    thigh = Transformed(EllipticCylinder((0.0, 4.0), (46.0 + fat, 50.0 + fat), 20.0, 400.0), femur_f)
    leg = EllipticCylinder((0.0, 8.0), (44.0 + fat, 50.0 + fat), -400.0, 25.0)
    bump = Transformed(Ellipsoid((0.0, -2.0, 0.0), (30.0, 13.0 + 0.6 * fat, 34.0)), patella_f)
    envelope = Union([thigh, leg, bump], k=18.0)
    s.append(Structure("skin_and_fat", envelope, Rimmed("skin", "fat", 1.6)))

    # ---- muscles ---------------------------------------------------------------------------------------------
    mus = Tissue("muscle")
    for name, shape, frame in [
        ("quadriceps", Ellipsoid((0.0, -12.0, 150.0), (44.0 * muscle, 32.0, 95.0)), "femur"),
        ("vastus_medialis", Ellipsoid((26.0, -6.0, 92.0), (18.0 * muscle, 24.0, 42.0)), "femur"),
        ("vastus_lateralis", Ellipsoid((-28.0, -4.0, 115.0), (16.0 * muscle, 26.0, 62.0)), "femur"),
        ("semimembranosus", Ellipsoid((20.0, 36.0, 125.0), (20.0 * muscle, 20.0, 90.0)), "femur"),
        ("biceps_femoris", Ellipsoid((-24.0, 34.0, 118.0), (18.0 * muscle, 19.0, 85.0)), "femur"),
        ("gastrocnemius_medial", Ellipsoid((19.0, 45.0, -48.0), (21.0 * muscle, 17.0, 72.0)), "root"),
        ("gastrocnemius_lateral", Ellipsoid((-18.0, 43.0, -44.0), (18.0 * muscle, 16.0, 64.0)), "root"),
        ("popliteus", Ellipsoid((-2.0, 33.0, -30.0), (25.0, 6.5, 11.0), rotation=rot_y(25.0)), "root"),
        ("soleus", Ellipsoid((0.0, 36.0, -140.0), (36.0 * muscle, 20.0, 90.0)), "root"),
        ("tibialis_anterior", Ellipsoid((-22.0, -6.0, -120.0), (13.0 * muscle, 16.0, 90.0)), "root"),
    ]:
        s.append(Structure(name, shape, mus, frame=frame))

    # ---- popliteal vessels and tibial nerve ------------------------------------------------------------------
    s.append(Structure("popliteal_vein", Capsule((7.0, 45.0, -90.0), fem((5.0, 44.0, 140.0)), 4.5), "vein"))
    s.append(Structure("popliteal_artery", Capsule((2.0, 40.0, -90.0), fem((0.0, 39.0, 140.0)), 3.2), "artery"))
    s.append(Structure("tibial_nerve", Capsule((0.0, 52.0, -90.0), fem((-2.0, 50.0, 140.0)), 2.4), "nerve"))

    # ---- joint fluid: physiologic sliver or effusion ------------------------------------------------------------
    r = lesion_rng["joint_effusion"]
    eff = float(r.uniform(5.0, 14.0))
    t = eff if present["joint_effusion"] else normal_fluid
    suprapatellar = Ellipsoid((0.0, -24.0 - t / 2.0, 58.0 + 0.6 * t), (22.0 + t, t / 2.0 + 0.6, 16.0 + 1.3 * t))
    gutters = [Ellipsoid((sx * (35.5 + t / 3.0), -12.0, 32.0), (t / 3.0 + 0.3, 4.0 + 0.9 * t, 4.0 + 0.9 * t))
               for sx in (1.0, -1.0)]
    posterior = [Ellipsoid((sx * 20.0, 32.0 + t / 3.0, 22.0), (3.0 + 0.6 * t, t / 3.0 + 0.3, 4.0 + 0.8 * t))
                 for sx in (1.0, -1.0)]
    s.append(Structure("joint_fluid", Union([suprapatellar] + gutters + posterior), "effusion", frame="femur",
                       soft_mm=0.3))
    sites["joint_effusion"] = fem((0.0, -10.0, 40.0))        # between the recesses, above the trochlea

    # ---- collateral ligaments (with injury oedema painted first) -----------------------------------------
    mcl_pts = [fem((36.8, 4.0, 30.0)), np.array([39.0, 2.0, 0.0]), np.array([38.5, 0.0, -15.0]),
               np.array([27.0, -4.0, -50.0])]
    lcl_pts = [fem((-37.0, 8.0, 28.0)), np.array([-41.5, 16.0, 0.0]), np.array([-42.5, 27.0, -22.0])]
    _collateral(s, sites, "mcl_injury", mcl_pts, lesion_rng["mcl_injury"], present["mcl_injury"],
                flat=True)
    _collateral(s, sites, "lcl_injury", lcl_pts, lesion_rng["lcl_injury"], present["lcl_injury"],
                flat=False)

    # ---- extensor mechanism ------------------------------------------------------------------------------------
    quad_top, quad_bottom = fem((0.0, -40.0, 115.0)), pat((0.0, -2.0, 18.5))
    s.append(Structure("quadriceps_tendon", band(quad_top, quad_bottom, (1, 0, 0), 14.0, 3.5), "tendon"))
    pt_top, pt_bottom = pat((0.0, -1.5, -17.5)), np.array([0.0, -25.0, -30.0])
    s.append(Structure("patellar_tendon", band(pt_top, pt_bottom, (1, 0, 0), 13.0, 2.8), "tendon"))
    if present["patellar_dislocation"]:
        retinac_c = pat((20.0, 2.0, 0.0))
        s.append(Structure("medial_retinaculum_edema", Ellipsoid(retinac_c, (retinac_r, 6.0, retinac_r * 1.2)),
                           "edema", soft_mm=2.5, opacity=0.8))

    # ---- cruciate ligaments ----------------------------------------------------------------------------------
    acl_am = Capsule(fem((-9.0, 19.0, 22.0)), (-1.0, -11.0, 1.0), 3.4)
    acl_pl = Capsule(fem((-11.0, 23.5, 16.0)), (-3.0, -5.0, 1.0), 3.2)
    acl_axis = Capsule(fem((-10.0, 21.0, 19.0)), (-2.0, -8.0, 1.0), 4.0)
    acl_tex = Waves(k=((0.0, 0.0, 0.0), (2 * np.pi / 2.2, 0.0, 0.0)), phase=(0.0, 1.0), amplitude=0.5)
    pcl_pts = [fem((7.0, -1.0, 17.0)), fem((4.0, 11.0, 20.0)), np.array([2.0, 21.0, 6.0]), np.array([0.0, 27.0, -10.0])]
    r_acl, r_pcl = lesion_rng["acl_tear"], lesion_rng["pcl_tear"]
    acl_complete = bool(r_acl.random() < 0.65)
    acl_tc, acl_gap = float(r_acl.uniform(0.25, 0.7)), float(r_acl.uniform(3.0, 10.0))
    acl_cloud, acl_cleft = float(r_acl.uniform(4.5, 7.0)), (float(r_acl.uniform(6.0, 14.0)),
                                                          float(r_acl.uniform(1.0, 1.8)))
    acl_segment, acl_swell = float(r_acl.uniform(3.0, 6.0)), float(r_acl.uniform(0.6, 1.2))
    pcl_complete = bool(r_pcl.random() < 0.4)
    pcl_tc, pcl_gap = float(r_pcl.uniform(0.3, 0.7)), float(r_pcl.uniform(3.0, 9.0))
    pcl_swell, pcl_cloud = float(r_pcl.uniform(1.2, 1.5)), float(r_pcl.uniform(5.5, 8.0))

    acl_sig = Tissue("torn_fibres", 0.75) if present["acl_tear"] and acl_complete else Striated("acl", acl_tex)
    s.append(Structure("acl", Union([acl_am, acl_pl], k=1.5), acl_sig, label=L["acl"]))
    pcl_radius = 5.0 * (pcl_swell if present["pcl_tear"] and not pcl_complete else 1.0)
    pcl_sig = Tissue("tendinosis") if present["pcl_tear"] and not pcl_complete else Tissue("ligament", 0.5)
    pcl = polyline(pcl_pts, pcl_radius, k=2.0)
    s.append(Structure("pcl", pcl, pcl_sig, label=L["pcl"]))

    sites["acl_tear"] = acl_axis.point(acl_tc)
    if present["acl_tear"]:
        if acl_complete:
            half = acl_gap / 2.0 / np.linalg.norm(np.subtract(acl_axis.b, acl_axis.a))
            gap = Capsule(acl_axis.point(max(acl_tc - half, 0.0)), acl_axis.point(min(acl_tc + half, 1.0)), acl_cloud)
            s.append(Structure("acl_tear_gap", gap, "edema", label=0, soft_mm=1.5, opacity=0.9))
            s.append(Structure("acl_tear_fluid", Capsule(gap.a, gap.b, acl_cloud * 0.45), "fluid", soft_mm=1.0,
                               opacity=0.8))
        else:
            # interstitial tear: the torn segment is swollen and of intermediate signal (oedematous fibres), with
            # a fluid cleft along the fibres in its middle and a thin oedema/haemorrhage cuff in the notch fat
            length, radius = acl_cleft
            axis_len = float(np.linalg.norm(np.subtract(acl_axis.b, acl_axis.a)))
            half = length / 2.0 / axis_len
            seg_half = half + acl_segment / axis_len
            seg_a, seg_b = acl_axis.point(max(acl_tc - seg_half, 0.0)), acl_axis.point(min(acl_tc + seg_half, 1.0))
            acl_shape = Union([acl_am, acl_pl], k=1.5)
            s.append(Structure("acl_partial_edema", Intersect(Offset(acl_shape, acl_swell + 1.5),
                                                              Capsule(seg_a, seg_b, acl_axis.ra + 3.0)),
                               "edema", soft_mm=1.5, opacity=0.5))
            s.append(Structure("acl_partial_segment", Intersect(Offset(acl_shape, acl_swell),
                                                                Capsule(seg_a, seg_b, acl_axis.ra + 2.0), k=1.0),
                               "torn_fibres", label=L["acl"]))
            cleft = Capsule(acl_axis.point(acl_tc - half), acl_axis.point(acl_tc + half), radius)
            s.append(Structure("acl_partial_tear", cleft, "fluid", opacity=0.9))
    pcl_mid = np.asarray(pcl_pts[1]) + pcl_tc * (np.asarray(pcl_pts[2]) - np.asarray(pcl_pts[1]))
    sites["pcl_tear"] = pcl_mid
    if present["pcl_tear"]:
        direction = np.asarray(pcl_pts[2]) - np.asarray(pcl_pts[1])
        direction /= np.linalg.norm(direction)
        if pcl_complete:
            gap = Capsule(pcl_mid - direction * pcl_gap / 2, pcl_mid + direction * pcl_gap / 2, pcl_cloud)
            s.append(Structure("pcl_tear_gap", gap, "edema", label=0, soft_mm=1.5, opacity=0.9))
            s.append(Structure("pcl_tear_fluid", Capsule(gap.a, gap.b, pcl_cloud * 0.4), "fluid", soft_mm=1.0,
                               opacity=0.8))
        else:
            blot = Capsule(pcl_mid - direction * 4.0, pcl_mid + direction * 4.0, pcl_radius * 0.55)
            s.append(Structure("pcl_interstitial_tear", blot, "fluid", opacity=0.7, soft_mm=1.0))

    # ---- menisci -------------------------------------------------------------------------------------------------
    # menisci: ring wedges on the plateau whose roof is capped by the femoral cartilage they cushion
    condyles = Offset(Transformed(femur_parts["distal"], femur_f), t_fem + 0.3)
    mm = Subtract(Subtract(Wedge((20.0, 4.0), (15.5, 23.0), 0.5, menisc_h, base=t_tib * 0.8),
                           Box((6.0, 4.0, 3.0), (4.5, 7.0, 8.0))), condyles)
    lm = Subtract(Subtract(Wedge((-20.0, 2.0), (14.5, 17.0), 0.45, menisc_h * 0.92, base=t_tib * 0.8),
                           Box((-6.0, 2.0, 3.0), (4.5, 4.0, 8.0))), condyles)
    s.append(Structure("medial_meniscus", mm, "meniscus", label=L["medial_meniscus"]))
    s.append(Structure("lateral_meniscus", lm, "meniscus", label=L["lateral_meniscus"]))
    for name, wedge, centre, radii, side in (("medial_meniscus_tear", mm, (20.0, 4.0), (15.5, 23.0), 1.0),
                                             ("lateral_meniscus_tear", lm, (-20.0, 2.0), (14.5, 17.0), -1.0)):
        tear, degeneration, site = _meniscal_tear(lesion_rng[name], wedge, centre, radii, side, menisc_h,
                                                  t_tib * 0.8)
        sites[name] = site
        if present[name]:
            s.append(Structure(f"{name}_degeneration", degeneration, "tendinosis", soft_mm=0.5))
            s.append(Structure(name, tear, "fluid", opacity=0.9))

    # ---- bones ----------------------------------------------------------------------------------------------------
    s.append(Structure("femur", femur_parts["bone"], Bone(1.4), label=L["femur"], frame="femur"))
    s.append(Structure("tibia", tibia_parts["bone"], Bone(1.4), label=L["tibia"]))
    fibula = Union([Ellipsoid((-34.0, 30.0, -28.0), (9.5, 9.5, 11.0)),
                    Capsule((-34.0, 31.0, -34.0), (-31.0, 34.0, -320.0), 8.0, 7.0)], k=5.0)
    s.append(Structure("fibula", fibula, Bone(1.4), label=L["fibula"]))
    # D-shaped in axial section: rounded anterior surface, broad posterior facets with a median ridge
    patella = Union([Intersect(Ellipsoid((0.0, -1.0, 0.0), (21.0, 13.0, 20.0)), HalfSpace((0.0, 1.0, 0.0), 6.0), k=2.0),
                     Capsule((0.0, 6.0, -9.0), (0.0, 6.0, 9.0), 3.5)], k=3.0)
    s.append(Structure("patella", patella, Bone(1.0), label=L["patella"], frame="patella"))
    _marrow_islands(s, rng, [("femur", (0.0, 0.0, 62.0), (26.0, 16.0, 18.0)), ("root", (0.0, 6.0, -36.0),
                                                                                 (24.0, 16.0, 16.0))],
                    {"femur": femur_parts["bone"], "root": tibia_parts["bone"]})
    sites["patellar_dislocation"] = pat((8.0, 0.0, 0.0)) if present["patellar_dislocation"] else \
        apply(femur_f @ patella_in_femur @ rigid(translation=(-disl_shift / 2.0, 0.0, 0.0)), (0.0, 0.0, 0.0))
    if present["patellar_dislocation"]:
        s.append(Structure("patella_bone_bruise",
                           Intersect(Ellipsoid((13.0, 4.0, -4.0), (bruise_pat_r, 7.0, bruise_pat_r * 1.2)),
                                     Offset(patella, -1.0)), "bone_bruise", frame="patella", soft_mm=2.0))
        s.append(Structure("femur_bone_bruise",
                           Intersect(Ellipsoid((-27.0, -12.0, 14.0), (bruise_fem_r, bruise_fem_r, bruise_fem_r)),
                                     Offset(femur_parts["distal"], -1.2)), "bone_bruise", frame="femur",
                           soft_mm=2.5))

    # ---- cartilage -------------------------------------------------------------------------------------------------
    articular = Intersect(Ellipsoid((0.0, 2.0, 14.0), (38.0, 46.0, 30.0)), Box((0.0, 2.0, 14.0), (31.5, 50.0, 35.0),
                                                                                rounding=3.0), k=2.0)
    fem_cart = Subtract(Intersect(Shell(femur_parts["distal"], 0.0, t_fem), articular, k=1.0),
                        Offset(femur_parts["notch"], 1.5))
    s.append(Structure("femoral_cartilage", fem_cart, Layered(depth_mm=t_fem * 0.4), label=L["femoral_cartilage"],
                       frame="femur"))
    plateaus = Union([EllipticCylinder((20.0, 4.0), (14.5, 21.0), -6.0, 6.0),
                      EllipticCylinder((-20.0, 2.0), (14.0, 17.0), -6.0, 6.0)])
    tib_cart = Intersect(Shell(tibia_parts["plateau"], 0.0, t_tib), plateaus)
    s.append(Structure("tibial_cartilage", tib_cart, Layered(depth_mm=t_tib * 0.4), label=L["tibial_cartilage"]))
    pat_cart = Intersect(Shell(patella, 0.0, t_pat), Ellipsoid((0.0, 10.0, -1.0), (20.0, 12.0, 17.0)), k=1.0)
    s.append(Structure("patellar_cartilage", pat_cart, Layered(depth_mm=t_pat * 0.4), label=L["patellar_cartilage"],
                       frame="patella"))

    to_patient = case_transform(scale, left, angles, position)
    return Phantom("knee", s, frames, to_patient, scale, dict(present), sites,
                   params={"scale": scale, "left": left, "flexion_deg": flexion, "fat_mm": fat,
                           "angles_deg": angles.tolist(),
                           "effusion_mm": t if present["joint_effusion"] else None})


def _marrow_islands(s: List[Structure], rng: np.random.Generator, regions, bones) -> None:
    """Residual red-marrow islands in the metaphyses: soft, slightly brighter patches (marrow heterogeneity)."""
    for frame, centre, half in regions:
        for _ in range(int(rng.integers(1, 4))):
            c = np.asarray(centre) + rng.uniform(-1.0, 1.0, 3) * np.asarray(half)
            r = rng.uniform(4.0, 9.0, 3)
            blob = Intersect(Ellipsoid(c, r), Offset(bones[frame], -2.5))
            s.append(Structure("red_marrow", blob, "red_marrow", frame=frame, soft_mm=3.0,
                               opacity=float(rng.uniform(0.4, 0.8))))


def _collateral(s: List[Structure], sites: Dict[str, np.ndarray], name: str, pts, rng: np.random.Generator,
                injured: bool, flat: bool) -> None:
    """A collateral ligament (flat MCL band or cord-like LCL); injury = oedema, thickening, grade-3 gap."""
    grade = int(rng.integers(1, 4))
    thick = float(rng.uniform(1.5, 2.8))
    edema = float(rng.uniform(2.0, 6.0))
    gap_at = int(rng.integers(0, len(pts) - 1))
    half_thick = 1.3 if flat else 2.4
    if injured and grade >= 2:
        half_thick *= thick

    def shape(ht: float):
        if flat:
            return Union([band(pts[i], pts[i + 1], (0, 1, 0), 6.0, ht, overhang=1.0) for i in range(len(pts) - 1)])
        return polyline(pts, ht, k=1.0)

    mid = np.asarray(pts[len(pts) // 2 - (0 if len(pts) % 2 else 1)], dtype=float)
    mid = (np.asarray(pts[0]) + np.asarray(pts[-1])) / 2.0 if len(pts) == 2 else mid
    sites[name] = mid
    if injured:
        s.append(Structure(f"{name}_edema", Offset(shape(half_thick), edema), "edema", soft_mm=2.0, opacity=0.85))
    s.append(Structure(name.split("_")[0], shape(half_thick), "torn_fibres" if injured and grade >= 2 else "ligament"))
    if injured and grade == 3:
        a, b = np.asarray(pts[gap_at]), np.asarray(pts[gap_at + 1])
        c = (a + b) / 2.0
        d = (b - a) / np.linalg.norm(b - a)
        s.append(Structure(f"{name}_gap", Capsule(c - 2.5 * d, c + 2.5 * d, half_thick + 1.5), "fluid", soft_mm=0.5))


def _meniscal_tear(rng: np.random.Generator, wedge, centre, radii, side: float, height: float, base: float):
    """A fluid cleft in a meniscus reaching its articular surface and the rim of intermediate (mucoid
    degeneration) signal around it inside the meniscus; returns (cleft, rim, site in root coords).

    Sizes are those of tears a reader calls at 3.5 mm slices: a cleft 1.2-2.5 mm thick (fluid in the tear plus
    partial volume), horizontal ones 8-18 mm long (on at least two consecutive slices), radial ones across most
    of the meniscal width (a thin cleft in the thin inner third alone would be invisible)."""
    where = rng.random()
    if where < 0.6:
        psi = float(rng.uniform(70.0, 110.0))             # posterior horn
    elif where < 0.8:
        psi = float(rng.uniform(-25.0, 25.0)) if side > 0 else float(rng.uniform(155.0, 205.0))   # body
    else:
        psi = float(rng.uniform(250.0, 290.0))            # anterior horn
    horizontal = bool(rng.random() < 0.6)
    length = float(rng.uniform(8.0, 18.0))
    width = float(rng.uniform(1.2, 2.5))
    tilt = float(rng.uniform(15.0, 35.0))
    rho = float(rng.uniform(0.7, 0.85))
    rim = float(rng.uniform(1.5, 2.5))
    c, sn = np.cos(np.deg2rad(psi)), np.sin(np.deg2rad(psi))
    radial = np.array([c * radii[1], sn * radii[0], 0.0])      # ellipse normal direction (unnormalised)
    radial /= np.linalg.norm(radial)
    circ = np.array([-radial[1], radial[0], 0.0])
    point = np.array([centre[0] + rho * radii[0] * c, centre[1] + rho * radii[1] * sn,
                      base + 0.8 * height * (rho - 0.5)])
    if horizontal:
        # cleft rising from the inferior surface toward the periphery, tilted by ``tilt`` from the plateau
        up = np.array([0.0, 0.0, 1.0])
        t = np.deg2rad(tilt)
        in_plane = radial * np.cos(t) + up * np.sin(t)
        normal = np.cross(circ, in_plane)
        rot = np.stack([circ, in_plane, normal], axis=1)
        cleft = Box(point, (length / 2.0, 12.0, width / 2.0), rot, rounding=width / 2.0 * 0.9)
    else:
        # radial tear: vertical cleft of full height from the free edge across 85-100 % of the wedge's width
        # (the thin inner third alone would hide it), its torn edges ``width`` apart
        rot = np.stack([circ, radial, np.array([0.0, 0.0, 1.0])], axis=1)
        inner = np.array([centre[0] + 0.5 * radii[0] * c, centre[1] + 0.5 * radii[1] * sn, base + height / 2.0])
        run = float(np.hypot(0.5 * radii[0] * c, 0.5 * radii[1] * sn))     # free edge to rim along ``radial``
        depth = run * (rho + 0.15)
        cleft = Box(inner + radial * depth / 2.0, (width / 2.0, depth / 2.0, height), rot, rounding=width / 2.0 * 0.9)
        point = inner + radial * depth / 2.0
    return Intersect(wedge, cleft), Intersect(wedge, Offset(cleft, rim)), point


MODEL = register(JointModel(
    name="knee", dataset_name="Knee", labels=LABELS, diagnoses=DIAGNOSES, prevalence=PREVALENCE,
    views={"sagittal": ViewLayout((150.0, 150.0), 110.0),
           "coronal": ViewLayout((150.0, 150.0), 120.0, spacing_scale=(0.95, 1.0)),
           "axial": ViewLayout((150.0, 150.0), 110.0, spacing_scale=(1.05, 1.15))},
    build=build, view_center=VIEW_CENTER,
    description="Synthetic knee MRI, PD-FS sagittal/coronal/axial stacks; 11 structures, 8 abnormalities"))
