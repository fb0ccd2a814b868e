"""The intermediate representation: the contract between the language and everything after it.

Every node keeps the span it came from so late checks still point at a line.
The runner and the exporters read only this (and the graph built from it).
Values are normalized: quantities carry the canonical unit of their dimension
(see :mod:`imtrial_dsl.units`), schedule offsets are in days, vendors are canonical.
"""
from __future__ import annotations

from enum import Enum
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .diagnostics import Span

IR_VERSION = "1.0"


class Node(BaseModel):
    """Base of every IR node: a source span, and nothing else in common."""

    model_config = ConfigDict(extra="forbid", use_enum_values=False)

    span: Optional[Span] = Field(default=None, description="Where in the source this node was written.")


class Ref(Node):
    """A by-name reference to another declaration, resolved by the checker."""

    name: str


# --------------------------------------------------------------------------- values

class Quantity(Node):
    """A number with a unit, normalized to the canonical unit of its dimension.

    ``value``/``unit`` are canonical (e.g. 2.3 s -> 2300 ms); ``source_value``/``source_unit``
    are what the author wrote, kept for messages, formatting and documents.
    """

    value: float
    unit: str = ""
    dimension: str = "none"
    source_value: Optional[float] = None
    source_unit: Optional[str] = None

    def text(self) -> str:
        v = self.source_value if self.source_value is not None else self.value
        u = self.source_unit if self.source_unit is not None else self.unit
        num = f"{v:g}"
        return f"{num} {u}".strip() if u != "%" else f"{num}%"


class Days(Node):
    """A calendar offset or window edge, in days; ``source_*`` keep e.g. '12 month'."""

    days: float
    source_value: float
    source_unit: str = "day"


Value = Union[Quantity, str, bool]


# --------------------------------------------------------------------------- study

class Endpoint(Node):
    name: str
    kind: Literal["primary", "secondary", "exploratory", "safety"] = "primary"
    description: str = ""
    measurement: Optional[Ref] = Field(default=None, description="'analysis.measurement' that feeds this endpoint.")


class StudyInfo(Node):
    code: str
    title: str
    registry: Optional[str] = None
    sponsor: Optional[str] = None
    version: Optional[str] = None
    phase: Optional[str] = None
    description: str = ""
    hypothesis: str = ""
    aims: list[str] = []
    endpoints: list[Endpoint] = []
    arms: list[str] = Field(default=[], description="Treatment arms; hidden from blinded roles.")


# --------------------------------------------------------------------------- sites and devices

ContactRole = Literal["imaging_pi", "physicist", "technologist", "coordinator", "pi", "data_manager", "radiologist", "other"]


class Contact(Node):
    role: str
    name: str
    email: Optional[str] = None
    phone: Optional[str] = None


class Approval(Node):
    """IRB / ethics approval of a site."""

    status: Literal["approved", "pending", "expired", "not_required"] = "pending"
    reference: Optional[str] = None
    date: Optional[str] = Field(default=None, description="ISO date, YYYY-MM-DD.")
    expires: Optional[str] = None


class Device(Node):
    id: str
    modality: str = Field(description="The first (or only) modality the device acquires.")
    modalities: list[str] = Field(default=[], description="Every modality of a hybrid device (PET/CT: ['PT', 'CT']); "
                                  "empty means [modality]. Use :meth:`acquires`.")
    vendor: str = Field(description="Canonical vendor (see vendors.normalize_vendor).")
    vendor_text: str = Field(default="", description="Vendor as written in the source.")
    model: Optional[str] = None
    software: Optional[str] = None
    field_strength: Optional[Quantity] = None
    serial: Optional[str] = None
    station: Optional[str] = None
    institution: Optional[str] = None
    ae_title: Optional[str] = Field(default=None, description="The device's DICOM AE title (worklist and listener calls).")
    coils: list[str] = []
    research_agreement: Optional[bool] = Field(default=None, description="None: not declared (unknown, not 'no').")

    def all_modalities(self) -> list[str]:
        return list(self.modalities) or ([self.modality] if self.modality else [])

    def acquires(self, modality: str) -> bool:
        """Does this device acquire ``modality`` (one of a hybrid's modalities)?"""
        return modality.upper() in {m.upper() for m in self.all_modalities()}


class Site(Node):
    code: str
    name: str
    contacts: list[Contact] = []
    irb: Optional[Approval] = None
    timezone: Optional[str] = None
    devices: list[Device] = []


# --------------------------------------------------------------------------- protocols

class MatchOp(str, Enum):
    MATCHES = "matches"      # regex search ('~')
    EQUALS = "equals"        # exact string ('=')
    CONTAINS = "contains"    # value (or any of a multi-valued attribute) equals ('has'), e.g. ImageType has "ORIGINAL"
    NOT_MATCHES = "not_matches"  # '!~'
    NOT_CONTAINS = "not_contains"  # '!has': no value of the attribute equals


class MatchRule(Node):
    """A series-selection rule; a protocol's rules are ANDed."""

    attribute: str
    op: MatchOp
    value: str


class ConstraintKind(str, Enum):
    """One-to-one with DICOM Attribute Value Constraint types, plus SET_OF and MATCHES.

    EQUAL may carry a tolerance (absolute or %); it is checked as |actual-nominal| <= tol.
    """

    EQUAL = "EQUAL"
    NOT_EQUAL = "NOT_EQUAL"
    RANGE_INCL = "RANGE_INCL"
    RANGE_EXCL = "RANGE_EXCL"
    GREATER_OR_EQUAL = "GREATER_OR_EQUAL"
    LESS_OR_EQUAL = "LESS_OR_EQUAL"
    GREATER_THAN = "GREATER_THAN"
    LESS_THAN = "LESS_THAN"
    SET_OF = "SET_OF"          # value in {a, b, c}
    MATCHES = "MATCHES"        # string matches regex (no DICOM equivalent; exported in JSON only)
    # multi-valued attributes (no DICOM equivalent; exported in JSON only)
    CONTAINS = "CONTAINS"          # 'has v': one of the values equals v
    NOT_CONTAINS = "NOT_CONTAINS"  # '!has v': no value equals v
    CONTAINS_ALL = "CONTAINS_ALL"  # 'has all {a, b}'
    CONTAINS_ANY = "CONTAINS_ANY"  # 'has any {a, b}'
    PRESENT = "PRESENT"            # 'present': the attribute is there with a value


class Significance(str, Enum):
    ERROR = "error"
    WARNING = "warning"
    INFO = "info"


class Tolerance(Node):
    value: float = Field(description="Absolute tolerance in the constraint's canonical unit, or percent when relative.")
    relative: bool = False
    source_value: Optional[float] = None
    source_unit: Optional[str] = None


class PathStep(Node):
    """One step of an attribute path: a keyword, or a private element by creator, with a selector.

    On a sequence, ``item`` picks its items (a number, 'any' or 'every'; None means every item);
    on the last step it is the value index (PixelSpacing[0]).
    """

    keyword: Optional[str] = None
    creator: Optional[str] = Field(default=None, description="Private creator, e.g. 'GEMS_PARM_01'.")
    tag: Optional[str] = Field(default=None, description="Private element '(gggg,xxee)'.")
    field: Optional[str] = Field(default=None, description="A field inside the private element: a Siemens CSA header "
                                 "element name ('B_value'), or 'MrPhoenixProtocol.KEY' for a key of its ASCCONV text.")
    item: Optional[Union[int, Literal["any", "every"]]] = None


class Constraint(Node):
    """A parameter constraint on a DICOM attribute keyword (or an attribute path).

    ``values``: EQUAL/NOT_EQUAL/comparisons one value; RANGE_* two (low, high); SET_OF many;
    MATCHES one regex string. ``index`` selects one value of a multi-valued attribute
    (e.g. PixelSpacing[0]); None means every value must satisfy the constraint.
    ``path`` is set when the attribute is not a plain top-level keyword: the steps into
    sequences and/or a private element (``keyword``/``index`` then mirror the last step;
    for a private element ``keyword`` is its tag text).
    """

    keyword: str
    path: list[PathStep] = []
    measure: Literal["value", "count"] = Field(default="value", description="'count': the constraint is on the number of values.")
    if_present: bool = Field(default=False, description="Holds when the attribute is absent ('if present').")
    kind: ConstraintKind
    values: list[Value]
    tolerance: Optional[Tolerance] = None
    significance: Significance = Significance.ERROR
    modifiable: bool = Field(default=False, description="DICOM Modifiable Constraint Flag: the technologist may change it.")
    index: Optional[int] = None
    note: Optional[str] = None


class Conditional(Node):
    """'when COND { … }': constraints on the frames (Enhanced objects) or instances where COND holds."""

    condition: "Constraint"
    constraints: list["Constraint"] = []


class Variant(Node):
    """Overrides for one vendor (optionally model and software release), one site or one device.

    A constraint here replaces the base constraint on the same attribute; ``remove`` drops one.
    Variants layer in the order of :data:`MERGE_ORDER` (see :func:`effective_chain`).
    """

    vendor: str = ""
    site: Optional[str] = None
    device: Optional[str] = None
    vendor_text: str = ""
    model: Optional[str] = None
    software: Optional[str] = Field(default=None, description="Software release or glob, e.g. 'XA30' or 'R5.*'.")
    constraints: list[Constraint] = []
    conditionals: list[Conditional] = []
    remove: list[str] = []

    def layer(self) -> str:
        """Which layer of :data:`MERGE_ORDER` this variant is."""
        if self.device:
            return "device"
        if self.site:
            return "site"
        return "vendor" + ("+model" if self.model else "") + ("+software" if self.software else "")

    def describe(self) -> str:
        if self.device:
            return f"device {self.device}"
        if self.site:
            return f"site {self.site}"
        return " ".join(x for x in (self.vendor, f'model "{self.model}"' if self.model else "",
                                    f'software "{self.software}"' if self.software else "") if x)


class Scope(Node):
    """'for site S, device D': the protocol applies at these sites and devices only."""

    sites: list[str] = []
    devices: list[str] = []


class Protocol(Node):
    name: str
    modality: str
    title: str = ""
    body_part: Optional[str] = None
    preparation: list[str] = Field(default=[], description="Subject preparation instructions.")
    contrast: Optional[str] = None
    match: list[MatchRule] = []
    constraints: list[Constraint] = []
    conditionals: list[Conditional] = []
    variants: list[Variant] = []
    scope: Optional[Scope] = None
    notes: list[str] = []

    def applies_to(self, site: Optional[str], device: Optional[str]) -> bool:
        """Is the protocol in scope for a device (True without a scope)?"""
        if self.scope is None:
            return True
        return (site in self.scope.sites) or (device in self.scope.devices)


# --------------------------------------------------------------------------- schedule

class Acquisition(Ref):
    """A protocol a visit acquires: ``optional``, and how many series it needs ('at least 2')."""

    optional: bool = False
    at_least: int = 1


class Visit(Node):
    name: str
    kind: Literal["screening", "baseline", "followup", "unscheduled"] = "followup"
    offset: Days
    event: Optional[str] = Field(default=None, description="An unscheduled visit triggered by this event, not a day; "
                                 "its window counts from the event.")
    window_before: Optional[Days] = Field(default=None, description="Days allowed before the target (positive number).")
    window_after: Optional[Days] = Field(default=None, description="Days allowed after the target.")
    acquire: list[Acquisition] = []
    optional: bool = False

    @field_validator("acquire", mode="before")
    @classmethod
    def _refs(cls, v: Any) -> Any:
        """A plain :class:`Ref` is a required acquisition of one series."""
        return [Acquisition(**r.model_dump()) if isinstance(r, Ref) and not isinstance(r, Acquisition) else r
                for r in v] if isinstance(v, list) else v

    def scheduled(self) -> bool:
        """A visit on the calendar (not triggered by an event)."""
        return self.event is None


#: Who receives a site's notices when none of their roles has a contact (with an e-mail) there.
REMINDER_FALLBACK_ROLES = ("imaging_pi", "pi", "coordinator")


class ReminderPolicy(Node):
    before_open: Optional[Days] = Field(default=None, description="Remind this long before the window opens.")
    notify: list[str] = Field(default=[], description="Contact roles (or 'central') that receive reminders.")
    on_open: bool = True
    overdue_after: Optional[Days] = Field(default=None, description="Escalate this long after the window closes (0 = when it closes).")
    escalate_to: list[str] = []


class Schedule(Node):
    visits: list[Visit] = []
    same_device: Literal["required", "preferred", "none"] = "none"
    reminders: Optional[ReminderPolicy] = None


# --------------------------------------------------------------------------- de-identification

class ProfileRule(Node):
    """One row of a de-identification profile table (e.g. PS3.15 Table E.1-1)."""

    tag: str = Field(description="'(gggg,eeee)'; repeating groups keep 'xx', e.g. '(50xx,xxxx)'.")
    name: str
    keyword: Optional[str] = None
    action: str = Field(description="Basic profile action code: D, Z, X, K, C, U, X/Z, X/D, X/Z/D, Z/D, X/Z/U*.")
    options: dict[str, str] = Field(default={}, description="Option name -> action code under that option.")


class DeidProfile(Node):
    name: str
    title: str = ""
    code: Optional[str] = Field(default=None, description="CID 7050 code value of the profile, e.g. 113100.")
    rules: list[ProfileRule] = []


class DeidOption(str, Enum):
    """PS3.15 Annex E options; values are the language's names. CID 7050 codes in dicom_tables."""

    RETAIN_LONGITUDINAL_FULL_DATES = "retain_longitudinal_full_dates"
    RETAIN_LONGITUDINAL_MODIFIED_DATES = "retain_longitudinal_modified_dates"
    RETAIN_PATIENT_CHARACTERISTICS = "retain_patient_characteristics"
    RETAIN_DEVICE_IDENTITY = "retain_device_identity"
    RETAIN_INSTITUTION_IDENTITY = "retain_institution_identity"
    RETAIN_UIDS = "retain_uids"
    RETAIN_SAFE_PRIVATE = "retain_safe_private"
    CLEAN_DESCRIPTORS = "clean_descriptors"
    CLEAN_STRUCTURED_CONTENT = "clean_structured_content"
    CLEAN_GRAPHICS = "clean_graphics"
    CLEAN_PIXEL_DATA = "clean_pixel_data"
    CLEAN_RECOGNIZABLE_VISUAL_FEATURES = "clean_recognizable_visual_features"


class DeidOverride(Node):
    attribute: str = Field(description="DICOM keyword or '(gggg,eeee)' tag.")
    action: Literal["keep", "remove", "empty", "replace", "hash"]
    value: Optional[str] = None


class PixelRegion(Node):
    """A rectangle to blank (burned-in annotation), for images matching the selector."""

    modality: Optional[str] = None
    vendor: Optional[str] = None
    model: Optional[str] = None
    rows: Optional[int] = None
    columns: Optional[int] = None
    x0: int
    y0: int
    x1: int
    y1: int


class KeySource(Node):
    """Where a secret comes from: never inline."""

    kind: Literal["env", "file"]
    ref: str


class Deidentify(Node):
    profile: Ref
    options: list[DeidOption] = []
    overrides: list[DeidOverride] = []
    pixel_regions: list[PixelRegion] = []
    key: Optional[KeySource] = None
    date_shift_min: Optional[Days] = Field(default=None, description="Per-subject keyed date shift lower bound (e.g. -365 d).")
    date_shift_max: Optional[Days] = None
    quarantine_burned_in: bool = True


# --------------------------------------------------------------------------- identifiers

class Identifiers(Node):
    subject_format: str = Field(description="e.g. 'AMY01-{site}-{seq:04}{check}'. Fields: site, seq, check, study.")
    check_digit: Optional[Literal["luhn", "mod11", "mod97", "iso7064"]] = None
    source: list[str] = Field(default=["PatientID"], description="Attributes that identify a person at a site.")
    issuer: Optional[str] = Field(default="IssuerOfPatientID", description="Attribute naming the assigning authority.")
    key: Optional[KeySource] = Field(default=None, description="Key for keyed hashing of source identifiers in the registry.")
    reidentification_log: bool = Field(default=False, description="Keep the plain re-identification maps (original "
                                       "identifiers and UIDs) site-side; otherwise only keyed hashes are stored.")


# --------------------------------------------------------------------------- QC and analyses

class QcCheck(Node):
    """A QC check: a built-in metric bound to protocols (or a whole modality) with thresholds."""

    name: str
    targets: list[Ref] = Field(default=[], description="Protocols this check applies to.")
    modality: Optional[str] = Field(default=None, description="Applies to every protocol of this modality (stdlib checks).")
    metric: str = Field(description="Built-in metric: snr, ghosting, clipping, slice_spacing, missing_slices, dynamic_range, ...")
    params: dict[str, Value] = {}
    severity: Significance = Significance.ERROR


class AnalysisInput(Node):
    name: str
    protocol: Optional[Ref] = None
    analysis_output: Optional[Ref] = Field(default=None, description="'analysis.output' of another analysis.")


class AnalysisOutput(Node):
    name: str
    kind: Literal["file", "directory"] = "file"


class Measurement(Node):
    name: str
    unit: str = ""
    dimension: str = "none"
    description: str = ""


class Analysis(Node):
    """A user step. ``command`` is an argv template ({input}, {output}, {name} placeholders); never run through a shell."""

    name: str
    inputs: list[AnalysisInput] = []
    command: list[str] = []
    outputs: list[AnalysisOutput] = []
    measurements: list[Measurement] = []
    timeout: Optional[Quantity] = None
    description: str = ""
    env: list[str] = Field(default=[], description="Environment variables passed to the program beyond the minimal "
                                                   "allow-list (PATH, HOME, locale, TMPDIR).")


# --------------------------------------------------------------------------- transfer, archive, roles, reports

class Destination(Node):
    name: str
    kind: Literal["dicom", "dicomweb", "folder"]
    ae_title: Optional[str] = None
    host: Optional[str] = None
    port: Optional[int] = None
    url: Optional[str] = None
    path: Optional[str] = None
    relay: Optional[Ref] = None
    auth: Optional[KeySource] = None
    identified: bool = Field(default=False, description="The destination may receive identified data (instances whose "
                                                        "PatientIdentityRemoved is NO because overrides keep identity).")


class Archive(Node):
    path: Optional[str] = None
    hash: Literal["sha256"] = "sha256"
    retention: Optional[Days] = None
    keep_originals: bool = False


#: The fields a role's ``hide`` may name (ops/reports.py removes each everywhere; the checker refuses others).
ROLE_HIDE_FIELDS = ("arm", "site", "device", "exam_date", "subject_id")


class Role(Node):
    name: str
    kind: Literal["central", "site", "reader", "sponsor", "monitor", "statistician"] = "central"
    scope: Literal["all", "own"] = "all"
    blinded: bool = False
    hide: list[str] = Field(default=[], description="Fields this role must not see: " + ", ".join(ROLE_HIDE_FIELDS) + ".")


class ReportAudience(Node):
    role: Ref
    scope: Optional[Literal["all", "own"]] = None


class Report(Node):
    name: str
    kind: Literal["management", "qc", "adherence", "enrollment", "qualification"] = "management"
    audience: list[ReportAudience] = []
    sections: list[str] = []
    every: Optional[Days] = None


class Qualification(Node):
    """Site-qualification policy: which protocols need a qualification exam before subjects."""

    protocols: list[Ref] = []
    phantom: Optional[str] = None
    requalify_on_upgrade: bool = True


# --------------------------------------------------------------------------- reads and document control

class ReadWindow(Node):
    """A display window/level preset: centre (level) and width in the image's stored units (HU for CT)."""

    name: str
    level: float
    width: float


class ReaderVariability(Node):
    """How agreement between readers is monitored: metric, the bound it must keep, what happens when it does not."""

    metric: str = Field(description="kappa, weighted_kappa, icc, agreement (fraction of reads that agree) or adjudication_rate.")
    op: Literal[">=", ">", "<=", "<"] = ">="
    threshold: float
    action: str = ""


class Read(Node):
    """An image interpretation (read): what is read, by whom, how, against which response criteria."""

    name: str
    title: str = ""
    protocols: list[Ref] = Field(default=[], description="Series of these protocols are read.")
    timepoints: list[Ref] = Field(default=[], description="Visits read; empty = every visit acquiring the protocols.")
    readers: int = 1
    adjudicators: int = 0
    paradigm: str = Field(default="single_reader", description="single_reader, independent_with_adjudication, consensus, majority.")
    adjudicate_on: list[str] = Field(default=[], description="What triggers adjudication, e.g. response_differs.")
    adjudication_rule: str = ""
    criteria: str = Field(default="", description="recist_1_1, irecist, rano, lugano or custom.")
    criteria_name: str = Field(default="", description="The named set of a custom criteria, or a note on the standard one.")
    qualification: str = ""
    training: str = ""
    blinded_to: list[str] = []
    display: str = ""
    windows: list[ReadWindow] = []
    unevaluable: str = ""
    variability: Optional[ReaderVariability] = None
    lock: str = ""
    # where each sub-clause was written ("readers", "adjudicators", "paradigm", "criteria", "adjudicate",
    # "adjudicate:TRIGGER", "blinded", "blinded:FIELD"), so a diagnostic points at it; not part of the IR's data
    clauses: dict[str, Span] = Field(default={}, exclude=True)

    def at(self, clause: str):
        """The span of a sub-clause, else the read's own (a clause that is missing, or an IR loaded from JSON)."""
        return self.clauses.get(clause) or self.span


class ChangelogEntry(Node):
    version: str
    date: str = Field(description="ISO date the version took effect, YYYY-MM-DD.")
    description: str = ""


class Approver(Node):
    """A signatory of the study's documents (a title, optionally a name)."""

    title: str
    name: Optional[str] = None


class Changelog(Node):
    """Version history of the study description and who approves its documents."""

    entries: list[ChangelogEntry] = []
    approvers: list[Approver] = []


class Import(Node):
    path: str
    resolved: Optional[str] = Field(default=None, description="Absolute path of the imported file.")


# --------------------------------------------------------------------------- the whole trial

class Trial(Node):
    """A checked trial description: the study and all its imports merged."""

    ir_version: str = IR_VERSION
    source_file: Optional[str] = None
    source_sha256: Optional[str] = Field(default=None, description="sha256 of the main source file's bytes.")
    imports: list[Import] = []
    study: Optional[StudyInfo] = None
    sites: list[Site] = []
    protocols: list[Protocol] = []
    schedule: Optional[Schedule] = None
    deid_profiles: list[DeidProfile] = []
    deidentify: Optional[Deidentify] = None
    identifiers: Optional[Identifiers] = None
    qc: list[QcCheck] = []
    analyses: list[Analysis] = []
    transfers: list[Destination] = []
    archive: Optional[Archive] = None
    roles: list[Role] = []
    reports: list[Report] = []
    qualification: Optional[Qualification] = None
    reads: list[Read] = []
    changelog: Optional[Changelog] = None

    # convenience lookups (derived, not stored)
    def protocol(self, name: str) -> Optional[Protocol]:
        return next((p for p in self.protocols if p.name == name), None)

    def site(self, code: str) -> Optional[Site]:
        return next((s for s in self.sites if s.code == code), None)

    def devices(self) -> list[tuple[Site, Device]]:
        return [(s, d) for s in self.sites for d in s.devices]

    def analysis(self, name: str) -> Optional[Analysis]:
        return next((a for a in self.analyses if a.name == name), None)

    def profile(self, name: str) -> Optional[DeidProfile]:
        return next((p for p in self.deid_profiles if p.name == name), None)

    def variant_devices(self, protocol: Protocol) -> tuple[list[tuple[Site, Device]], list[list[tuple[Site, Device]]]]:
        """Inventory devices of the protocol's modality by the variant that applies to them:
        (devices on the base constraints, one list per variant in declaration order)."""
        base: list[tuple[Site, Device]] = []
        per_variant: list[list[tuple[Site, Device]]] = [[] for _ in protocol.variants]
        for site, dev in self.devices():
            if not dev.acquires(protocol.modality):
                continue
            _, chosen = effective_constraints(protocol, dev.vendor, dev.software, dev.model, site=site.code, device=dev.id)
            if chosen is None:
                base.append((site, dev))
            else:
                per_variant[next(i for i, v in enumerate(protocol.variants) if v is chosen)].append((site, dev))
        return base, per_variant

    def qc_for(self, protocol: Protocol) -> list[QcCheck]:
        """QC checks that apply to a protocol: bound by name, or by modality."""
        return [
            q for q in self.qc
            if any(t.name == protocol.name for t in q.targets) or (q.modality and q.modality == protocol.modality and not q.targets)
        ]


#: The order variants layer in, least specific first: each layer's constraints replace those of the
#: layers before it on the same attribute, and its ``remove`` drops them.
MERGE_ORDER = ("vendor", "vendor+model", "vendor+software", "vendor+model+software", "site", "device")


def constraint_key(c: Constraint) -> str:
    """What a variant's constraint replaces: the attribute as written (path and value index included)."""
    from .source import parameter

    return ("count " if c.measure == "count" else "") + parameter(c)


def effective_chain(protocol: Protocol, vendor: str = "", software: Optional[str] | list[str] = None,
                    model: Optional[str] = None, *, site: Optional[str] = None,
                    device: Optional[str] = None) -> list[Variant]:
    """The variants that apply to a device, in merge order (see :data:`MERGE_ORDER`)."""
    from .vendors import normalize_vendor, software_matches

    v = normalize_vendor(vendor)
    hits: list[tuple[int, int, Variant]] = []
    for i, var in enumerate(protocol.variants):
        if var.device or var.site:
            if (var.device and var.device == device) or (var.site and var.site == site):
                hits.append((MERGE_ORDER.index(var.layer()), i, var))
            continue
        if var.vendor != v:
            continue
        if var.model and (not model or var.model.lower() != str(model).lower()):
            continue
        if var.software and not software_matches(var.software, software):
            continue
        hits.append((MERGE_ORDER.index(var.layer()), i, var))
    return [var for _, _, var in sorted(hits, key=lambda h: (h[0], h[1]))]


def merge(base: list[Constraint], chain: list[Variant]) -> list[tuple[Constraint, Optional[Variant]]]:
    """Layer ``chain`` over ``base``: (constraint, the variant it came from or None for the base)."""
    out: list[tuple[Constraint, Optional[Variant]]] = [(c, None) for c in base]
    for var in chain:
        drop = {constraint_key(c) for c in var.constraints} | set(var.remove)
        out = [(c, src) for c, src in out if constraint_key(c) not in drop and c.keyword not in var.remove]
        out += [(c, var) for c in var.constraints]
    return out


def effective_constraints(protocol: Protocol, vendor: str = "", software: Optional[str] | list[str] = None,
                          model: Optional[str] = None, *, site: Optional[str] = None,
                          device: Optional[str] = None) -> tuple[list[Constraint], Optional[Variant]]:
    """The constraints that apply to a device: the base constraints with every applicable variant
    layered over them in :data:`MERGE_ORDER`; also the most specific variant applied (or None)."""
    chain = effective_chain(protocol, vendor, software, model, site=site, device=device)
    if not chain:
        return list(protocol.constraints), None
    return [c for c, _ in merge(list(protocol.constraints), chain)], chain[-1]


def effective_conditionals(protocol: Protocol, chain: list[Variant]) -> list[Conditional]:
    """The protocol's 'when' blocks plus those of the applicable variants."""
    return list(protocol.conditionals) + [w for var in chain for w in var.conditionals]


def strip_spans(obj: Any) -> Any:
    """A plain-data copy of an IR value without spans (for structural equality, e.g. fmt round trips)."""
    if isinstance(obj, BaseModel):
        obj = obj.model_dump(mode="json")
    if isinstance(obj, dict):
        return {k: strip_spans(v) for k, v in obj.items() if k not in ("span", "resolved", "source_file", "source_sha256")}
    if isinstance(obj, list):
        return [strip_spans(v) for v in obj]
    return obj
