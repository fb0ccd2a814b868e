"""A small three-site trial built directly as IR (mirrors examples/amyloid_mri.imtrial in shape).

Used by the unit tests of ``imtrial_dsl.ops`` so they do not depend on the parser; the
acceptance test uses the real example file through the compiler.
"""
from imtrial_dsl import ir

KEY_ENV = "IMTRIAL_OPS_TEST_KEY"
KEY = "ops-test-key-0123456789abcdef"


def days(n, unit="day"):
    return ir.Days(days=n, source_value=n, source_unit=unit)


def q(v, unit, dim):
    return ir.Quantity(value=v, unit=unit, dimension=dim)


def trial() -> ir.Trial:
    c = ir.Contact
    sites = [
        ir.Site(code="BOS", name="Boston General Hospital",
                contacts=[c(role="imaging_pi", name="A. Rivera", email="rivera@bgh.example"),
                          c(role="technologist", name="J. Chen", email="chen@bgh.example"),
                          c(role="coordinator", name="M. Okafor", email="okafor@bgh.example")],
                irb=ir.Approval(status="approved", reference="IRB-2026-0042", date="2026-01-15"),
                devices=[ir.Device(id="BOS_MR1", modality="MR", vendor="Siemens", model="MAGNETOM Prisma",
                                   software="XA30", serial="166012", station="BOSMR1")]),
        ir.Site(code="LYN", name="Lyon University Hospital",
                contacts=[c(role="imaging_pi", name="C. Martin", email="martin@chu-lyon.example"),
                          c(role="physicist", name="P. Durand", email="durand@chu-lyon.example")],
                devices=[ir.Device(id="LYN_MR1", modality="MR", vendor="GE", model="SIGNA Premier",
                                   software="MR30.1", serial="GEP0042", station="LYNMR1")]),
        ir.Site(code="TOK", name="Tokyo Medical Center",
                contacts=[c(role="imaging_pi", name="H. Sato", email="sato@tmc.example"),
                          c(role="technologist", name="K. Ito", email="ito@tmc.example")],
                devices=[ir.Device(id="TOK_MR1", modality="MR", vendor="Philips", model="Ingenia Elition X",
                                   software="R5.7", serial="PH77001")]),
    ]
    ms = ("ms", "time")
    protocols = [
        ir.Protocol(name="T1w", modality="MR", match=[ir.MatchRule(attribute="SeriesDescription", op=ir.MatchOp.MATCHES, value="(?i)t1w")],
                    constraints=[ir.Constraint(keyword="RepetitionTime", kind=ir.ConstraintKind.EQUAL, values=[q(2300, *ms)])],
                    variants=[ir.Variant(vendor="Siemens", software="XA30",
                                         constraints=[ir.Constraint(keyword="SequenceName", kind=ir.ConstraintKind.MATCHES, values=["tfl3d1"])]),
                              ir.Variant(vendor="GE", constraints=[ir.Constraint(keyword="RepetitionTime", kind=ir.ConstraintKind.EQUAL, values=[q(7.3, *ms)])]),
                              ir.Variant(vendor="Philips", software="R5.*", constraints=[ir.Constraint(keyword="RepetitionTime", kind=ir.ConstraintKind.EQUAL, values=[q(6.8, *ms)])])]),
        ir.Protocol(name="FLAIR", modality="MR", match=[ir.MatchRule(attribute="SeriesDescription", op=ir.MatchOp.MATCHES, value="(?i)flair")],
                    variants=[ir.Variant(vendor="GE", constraints=[])]),
        ir.Protocol(name="SWI", modality="MR", match=[ir.MatchRule(attribute="SeriesDescription", op=ir.MatchOp.MATCHES, value="(?i)swi")]),
    ]
    R = ir.Ref
    sched = ir.Schedule(
        visits=[ir.Visit(name="baseline", kind="baseline", offset=days(0), window_before=days(-7), window_after=days(7),
                         acquire=[R(name="T1w"), R(name="FLAIR"), R(name="SWI")]),
                ir.Visit(name="m12", offset=days(365), window_before=days(-14), window_after=days(28),
                         acquire=[R(name="T1w"), R(name="FLAIR"), R(name="SWI")]),
                ir.Visit(name="m24", offset=days(730), window_before=days(-14), window_after=days(28),
                         acquire=[R(name="T1w"), R(name="FLAIR"), R(name="SWI")])],
        same_device="required",
        reminders=ir.ReminderPolicy(before_open=days(7), notify=["technologist", "coordinator"],
                                    overdue_after=days(0), escalate_to=["imaging_pi", "central"]))
    return ir.Trial(
        study=ir.StudyInfo(code="AMY01", title="Longitudinal amyloid MRI study", version="1.2", arms=["placebo", "drug_x"]),
        sites=sites, protocols=protocols, schedule=sched,
        qc=[ir.QcCheck(name="t1_snr", targets=[R(name="T1w"), R(name="FLAIR")], metric="snr", params={})],
        analyses=[ir.Analysis(name="hipvol", inputs=[ir.AnalysisInput(name="t1", protocol=R(name="T1w"))])],
        roles=[ir.Role(name="central", kind="central"), ir.Role(name="site", kind="site", scope="own"),
               ir.Role(name="reader", kind="reader", blinded=True, hide=["arm", "site"]),
               ir.Role(name="sponsor", kind="sponsor", blinded=True, hide=["arm"])],
        reports=[ir.Report(name="weekly", audience=[ir.ReportAudience(role=R(name="central")),
                                                    ir.ReportAudience(role=R(name="site"), scope="own")],
                           sections=["enrollment", "adherence", "qc", "overdue", "qualification"])],
        qualification=ir.Qualification(protocols=[R(name="T1w"), R(name="FLAIR")], requalify_on_upgrade=True),
        # the study key codes reports outside the site (reader and exam codes, per-subject date shifts)
        deidentify=ir.Deidentify(profile=R(name="ps315_basic"),
                                 options=[ir.DeidOption.RETAIN_LONGITUDINAL_MODIFIED_DATES],
                                 key=ir.KeySource(kind="env", ref=KEY_ENV)),
    )
