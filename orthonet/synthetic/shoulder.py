"""Shoulder phantom: 9 labelled bones/tendons and 7 transfer abnormalities on PD-FS.

Root frame (mm): origin at the centre of the humeral head, x medial, y posterior, z superior (a right shoulder
maps to LPS as is; a left one is mirrored). The humerus carries its own frame (arm rotation). Coronal and sagittal
stacks are planned oblique, parallel and perpendicular to the supraspinatus, as in clinical protocols.

Lesions:

* supraspinatus / infraspinatus / subscapularis_tear: fluid-filled defect in the dark tendon cap near its footprint,
  partial (articular or bursal side) or full thickness, 5-20 mm, in a zone of tendinosis (intermediate-signal
  tendon reaching 3-6 mm beyond the defect).
* biceps_tendon_injury: thickened long-head tendon of intermediate signal with fluid in its sheath.
* ac_joint_arthritis: distended AC joint capsule (fluid / synovium), subchondral oedema of the acromion and clavicle
  ends, an inferior osteophyte.
* glenohumeral_effusion: fluid distending the axillary and subscapular recesses and the biceps sheath.
* subacromial_bursitis: a bright fluid layer in the subacromial-subdeltoid bursa over the cuff.
"""
from __future__ import annotations

from typing import Dict, List

import numpy as np

from orthonet.synthetic.intensities import Bone, Layered, Rimmed
from orthonet.synthetic.joints import CaseRandom, JointModel, ViewLayout, register
from orthonet.synthetic.phantom import Phantom, Structure, apply, case_transform, rigid, rot_y, rot_z
from orthonet.synthetic.shapes import (Box, Capsule, Cone, Ellipsoid, HalfSpace, Intersect, Offset, Shell, Sphere,
                                       Subtract, SuperEllipsoid, Union, polyline)

LABELS = ("humerus", "scapula", "acromion", "clavicle", "humeral_cartilage", "supraspinatus_tendon",
          "infraspinatus_tendon", "subscapularis_tendon", "biceps_tendon")
DIAGNOSES = ("supraspinatus_tear", "infraspinatus_tear", "subscapularis_tear", "biceps_tendon_injury",
             "ac_joint_arthritis", "glenohumeral_effusion", "subacromial_bursitis")
PREVALENCE = {"supraspinatus_tear": 0.42, "infraspinatus_tear": 0.28, "subscapularis_tear": 0.28,
              "biceps_tendon_injury": 0.3, "ac_joint_arthritis": 0.38, "glenohumeral_effusion": 0.35,
              "subacromial_bursitis": 0.35}
L = {name: i + 1 for i, name in enumerate(LABELS)}
VIEW_CENTER = (8.0, 2.0, 8.0)
HEAD_R = 23.0

#: Rotator-cuff tendons as caps over the humeral head: (label, axis in the humerus frame, half-angle)
CUFF = {"supraspinatus": ((-0.25, -0.05, 1.0), 34.0), "infraspinatus": ((-0.3, 0.85, 0.45), 32.0),
        "subscapularis": ((0.05, -1.0, 0.05), 32.0)}


def build(rngs: CaseRandom, present: Dict[str, bool]) -> Phantom:
    """One shoulder exam's phantom."""
    rng = rngs.stream("anatomy")
    scale = float(rng.uniform(0.88, 1.12))
    left = bool(rng.random() < 0.5)
    arm_rot = float(rng.uniform(-15.0, 20.0))          # external rotation of the arm
    angles = rng.normal(0.0, 3.0, 3)
    position = np.array([170.0 if left else -170.0, 20.0, -60.0]) + rng.uniform(-15.0, 15.0, 3)
    fat = float(rng.uniform(5.0, 14.0))
    t_cart = float(rng.uniform(1.2, 1.8))
    cuff_t = float(rng.uniform(4.0, 6.0))
    fluid = float(rng.uniform(0.3, 1.0))
    humerus_f = rigid(rot_z(arm_rot))
    frames = {"root": np.eye(4), "humerus": humerus_f}
    hum = lambda p: apply(humerus_f, p)   # noqa: E731
    lesion_rng = {name: rngs.stream(f"lesion:{name}") for name in DIAGNOSES}
    s: List[Structure] = []
    sites: Dict[str, np.ndarray] = {}
    r_cuff = HEAD_R + t_cart + 0.3                      # inner radius of the cuff cap

    # ---- envelope and muscles --------------------------------------------------------------------------------
    env = Union([Ellipsoid((20.0, 8.0, 0.0), (72.0 + fat, 62.0 + fat, 85.0 + fat)),
                 Capsule((-20.0, 0.0, -40.0), (-30.0, 5.0, -300.0), 45.0 + fat),
                 Box((120.0, 10.0, -20.0), (70.0, 70.0 + fat, 120.0))], k=25.0)
    s.append(Structure("skin_and_fat", env, Rimmed("skin", "fat", 1.6)))
    normal_bursa = float(rng.uniform(0.2, 0.6))
    bursitis = float(lesion_rng["subacromial_bursitis"].uniform(2.0, 6.0))
    bursa_t = bursitis if present["subacromial_bursitis"] else normal_bursa
    deltoid_r0 = r_cuff + cuff_t + bursa_t + 0.5
    deltoid = Union([Intersect(Shell(Sphere((0.0, 0.0, 0.0), deltoid_r0), 0.0, 16.0),
                               Cone((0.0, 0.0, 0.0), (-1.0, 0.0, 0.35), 75.0)),
                     Capsule((-30.0, 0.0, -25.0), (-24.0, 0.0, -130.0), 16.0, 10.0)], k=6.0)
    for name, shape in [("deltoid", deltoid),
                        ("supraspinatus_muscle", Capsule((22.0, 6.0, 30.0), (100.0, 28.0, 40.0), 10.0, 14.0)),
                        ("infraspinatus_muscle", Ellipsoid((70.0, 42.0, -15.0), (45.0, 12.0, 42.0), rot_z(20.0))),
                        ("subscapularis_muscle", Ellipsoid((65.0, 2.0, -12.0), (40.0, 11.0, 40.0), rot_z(20.0))),
                        ("teres_minor", Ellipsoid((35.0, 38.0, -40.0), (25.0, 10.0, 12.0))),
                        ("trapezius", Ellipsoid((80.0, 20.0, 62.0), (70.0, 30.0, 12.0)))]:
        s.append(Structure(name, shape, "muscle"))

    # ---- bursa (fat stripe normally, fluid in bursitis) -----------------------------------------------------
    bursa = Intersect(Shell(Sphere((0.0, 0.0, 0.0), r_cuff + cuff_t + 0.2), 0.0, bursa_t),
                      Cone((0.0, 0.0, 0.0), (-0.55, 0.0, 0.85), 55.0))
    sites["subacromial_bursitis"] = np.array([-0.55, 0.0, 0.85]) / np.linalg.norm([-0.55, 0.0, 0.85]) * (
        r_cuff + cuff_t + bursa_t / 2.0)
    s.append(Structure("subacromial_bursa", bursa, "bursa" if present["subacromial_bursitis"] else "fat",
                       soft_mm=0.3))

    # ---- glenohumeral joint fluid ------------------------------------------------------------------------------
    r = lesion_rng["glenohumeral_effusion"]
    effusion = float(r.uniform(3.0, 9.0))
    eff = effusion if present["glenohumeral_effusion"] else fluid
    axillary = Intersect(Shell(Sphere((0.0, 0.0, 0.0), HEAD_R + t_cart), 0.0, eff + 0.4),
                         Cone((0.0, 0.0, 0.0), (0.35, 0.0, -1.0), 45.0))
    subscap_recess = Ellipsoid((26.0, -20.0, 12.0), (8.0 + eff, eff / 2.0 + 0.5, 10.0 + eff))
    s.append(Structure("joint_fluid", Union([axillary, subscap_recess]), "effusion"))
    sites["glenohumeral_effusion"] = np.array([8.0, 0.0, -(HEAD_R + t_cart + eff / 2.0)])

    # ---- AC joint -------------------------------------------------------------------------------------------------
    r = lesion_rng["ac_joint_arthritis"]
    ac_centre = np.array([24.0, -2.0, 41.0])
    sites["ac_joint_arthritis"] = ac_centre
    capsule_r = float(r.uniform(4.0, 8.0))
    ac_edema = float(r.uniform(4.0, 9.0))
    if present["ac_joint_arthritis"]:
        s.append(Structure("ac_capsule", Ellipsoid(ac_centre + [0.0, 0.0, 1.0], (capsule_r, capsule_r + 3.0,
                                                                               capsule_r)), "synovium",
                           soft_mm=1.0))
        s.append(Structure("ac_joint_fluid", Ellipsoid(ac_centre, (2.0, 7.0, 5.0)), "fluid", soft_mm=0.5))

    # ---- tendons ------------------------------------------------------------------------------------------------
    cuff_shapes = {}
    for name, (axis, half_angle) in CUFF.items():
        cap = Intersect(Shell(Sphere((0.0, 0.0, 0.0), r_cuff), 0.0, cuff_t), Cone((0.0, 0.0, 0.0), axis, half_angle))
        cuff_shapes[name] = cap
        s.append(Structure(f"{name}_tendon", cap, "tendon", label=L[f"{name}_tendon"], frame="humerus"))
    for name, (axis, half_angle) in CUFF.items():
        lesion = f"{name}_tear"
        r = lesion_rng[lesion]
        size = float(r.uniform(5.0, 20.0))
        kind = int(r.integers(0, 3))                      # 0 full thickness, 1 articular side, 2 bursal side
        a = np.asarray(axis, float) / np.linalg.norm(axis)
        # the tear sits toward the footprint (lateral/anterior edge of the cap): tilt the axis toward -x
        tilt = a + np.array([-0.35, 0.0, 0.0]) * float(r.uniform(0.5, 1.0))
        tilt /= np.linalg.norm(tilt)
        depth = {0: (0.0, cuff_t), 1: (0.0, cuff_t * 0.55), 2: (cuff_t * 0.45, cuff_t)}[kind]
        centre = tilt * (r_cuff + (depth[0] + depth[1]) / 2.0)
        tendinosis = float(r.uniform(3.0, 6.0))
        sites[lesion] = hum(centre)
        if present[lesion]:
            # tears arise in degenerate tendon: intermediate signal in the cap around the defect
            s.append(Structure(f"{lesion}_tendinosis", Intersect(Sphere(centre, size / 2.0 + 1.0 + tendinosis),
                                                                 cuff_shapes[name]),
                               "tendinosis", frame="humerus", soft_mm=1.0))
            defect = Intersect(Intersect(Shell(Sphere((0.0, 0.0, 0.0), r_cuff), depth[0], depth[1]),
                                         Sphere(centre, size / 2.0 + 1.0)), cuff_shapes[name])
            s.append(Structure(lesion, defect, "fluid", label=0 if kind == 0 else None, frame="humerus",
                               soft_mm=0.4, opacity=0.9))

    r = lesion_rng["biceps_tendon_injury"]
    biceps_pts = [(30.0, -2.0, 22.0), (6.0, -12.0, 27.0), (-16.0, -21.0, 13.0), (-19.0, -20.0, -50.0),
                  (-21.0, -16.0, -140.0)]
    biceps_r = 2.6
    thick = float(r.uniform(1.4, 1.9))
    sheath = float(r.uniform(1.5, 3.5))
    sites["biceps_tendon_injury"] = hum((-18.0, -21.0, -10.0))
    if present["biceps_tendon_injury"]:
        s.append(Structure("biceps_sheath_fluid", Intersect(polyline(biceps_pts, biceps_r * thick + sheath, k=1.0),
                                                            HalfSpace((0.0, 0.0, 1.0), 12.0)),
                           "fluid", frame="humerus", soft_mm=0.5))
    s.append(Structure("biceps_tendon", polyline(biceps_pts, biceps_r * (thick if present["biceps_tendon_injury"]
                                                                          else 1.0), k=1.0),
                       "tendinosis" if present["biceps_tendon_injury"] else "tendon", label=L["biceps_tendon"],
                       frame="humerus"))

    # ---- bones ---------------------------------------------------------------------------------------------------
    head = Sphere((0.0, 0.0, 0.0), HEAD_R)
    greater, lesser = Ellipsoid((-20.0, -4.0, 10.0), (9.0, 13.0, 11.0)), Ellipsoid((-11.0, -19.0, 0.0), (6.0, 6.0, 9.0))
    humerus = Union([head, greater, lesser,
                     Capsule((-12.0, 0.0, -16.0), (-20.0, 2.0, -320.0), 15.0, 12.0)], k=8.0)
    humerus = Subtract(humerus, Capsule((-17.0, -22.0, 16.0), (-20.0, -20.0, -60.0), 3.6), k=1.5)
    s.append(Structure("humerus", humerus, Bone(1.2), label=L["humerus"], frame="humerus"))
    glenoid = Subtract(SuperEllipsoid((35.0, 3.0, 0.0), (9.0, 13.0, 19.0)),
                       Sphere((0.0, 0.0, 0.0), HEAD_R + 2 * t_cart + 1.0), k=1.0)
    scapula = Union([glenoid, Capsule((40.0, 4.0, 0.0), (62.0, 12.0, -2.0), 10.0, 7.0),
                     Box((100.0, 28.0, -25.0), (45.0, 3.5, 55.0), rotation=rot_z(22.0), rounding=2.0),
                     Capsule((40.0, -4.0, 20.0), (24.0, -28.0, 20.0), 6.0, 5.0),
                     Capsule((22.0, 16.0, 36.0), (95.0, 36.0, 26.0), 6.0, 5.0)], k=5.0)
    s.append(Structure("scapula", scapula, Bone(1.2), label=L["scapula"]))
    s.append(Structure("glenoid_cartilage", Intersect(Shell(glenoid, 0.0, t_cart), Sphere((0.0, 0.0, 0.0),
                                                                                          HEAD_R + 2 * t_cart + 2.0)),
                       Layered(depth_mm=t_cart * 0.4)))
    labrum = Intersect(Shell(Sphere((0.0, 0.0, 0.0), HEAD_R + t_cart + 0.5), 0.0, 4.0),
                       Intersect(Cone((0.0, 0.0, 0.0), (1.0, 0.05, 0.0), 52.0),
                                 Subtract(Sphere((31.0, 2.0, 0.0), 26.0), Sphere((31.0, 2.0, 0.0), 14.0))))
    s.append(Structure("labrum", labrum, "labrum"))
    acromion_osteophyte = Ellipsoid((22.0, -2.0, 33.0), (5.0, 6.0, 3.5))
    acromion = SuperEllipsoid((-2.0, 8.0, 39.0), (22.0, 16.0, 5.0), rotation=rot_y(-8.0))
    if present["ac_joint_arthritis"]:
        acromion = Union([acromion, acromion_osteophyte], k=3.0)
    s.append(Structure("acromion", acromion, Bone(1.0), label=L["acromion"]))
    clavicle = Capsule((31.0, -6.0, 41.0), (120.0, -34.0, 50.0), 8.0, 9.5)
    s.append(Structure("clavicle", clavicle, Bone(1.3), label=L["clavicle"]))
    if present["ac_joint_arthritis"]:
        for bone_shape, name in ((acromion, "acromion"), (clavicle, "clavicle")):
            s.append(Structure(f"{name}_edema", Intersect(Sphere(ac_centre, ac_edema), Offset(bone_shape, -0.8)),
                               "bone_bruise", soft_mm=2.0, opacity=0.85))

    # ---- humeral head cartilage ----------------------------------------------------------------------------------
    art_axis = np.array([0.9, 0.1, 0.45])
    s.append(Structure("humeral_cartilage", Intersect(Shell(head, 0.0, t_cart), Cone((0.0, 0.0, 0.0), art_axis, 62.0)),
                       Layered(depth_mm=t_cart * 0.4), label=L["humeral_cartilage"], frame="humerus"))

    to_patient = case_transform(scale, left, angles, position)
    return Phantom("shoulder", s, frames, to_patient, scale, dict(present), sites,
                   params={"scale": scale, "left": left, "arm_rotation_deg": arm_rot, "fat_mm": fat,
                           "angles_deg": angles.tolist()})


MODEL = register(JointModel(
    name="shoulder", dataset_name="Shoulder", labels=LABELS, diagnoses=DIAGNOSES, prevalence=PREVALENCE,
    views={"sagittal": ViewLayout((150.0, 150.0), 100.0, tilt_deg=(0.0, 0.0, -30.0)),
           "coronal": ViewLayout((150.0, 150.0), 100.0, tilt_deg=(0.0, 0.0, -30.0)),
           "axial": ViewLayout((150.0, 150.0), 110.0, spacing_scale=(1.0, 1.15))},
    build=build, view_center=VIEW_CENTER,
    description="Synthetic shoulder MRI, PD-FS oblique sagittal/oblique coronal/axial stacks; 9 structures, "
                "7 abnormalities"))
