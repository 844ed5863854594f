#!/usr/bin/env python3
"""Synthetic invoices with ground truth, and the vendor/policy corpus the workflow retrieves from.

Vendors, currencies and policy figures are defined once, here, and both the invoices and the
corpus are written from them, so the labels, the invoice text and the reference data the model
reads can never disagree. Output is a pure function of ``--seed`` and ``--count``: the committed
set in this folder is what ``python generate_invoices.py`` writes, and a test checks that nobody
edited it by hand.

Each invoice is short on purpose (about 300-800 characters): the demo runs the whole set through a
tiny model on two CPU cores. A few are malformed the way real inboxes are: an empty file, a
truncated one, binary garbage that is not UTF-8, and one that never states its total. Unparseable
inputs have ``labels: null``; a field the document does not show is labelled ``null``.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from dataclasses import dataclass
from datetime import date, timedelta
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_SEED = 7
DEFAULT_COUNT = 24
FIELDS = ("vendor", "invoice_number", "date", "currency", "total")
MALFORMED = ("empty", "truncated", "garbage", "missing-total")
LAYOUTS = ("letter", "table", "keyvalue")
CENT = Decimal("0.01")


def iban(country: str, bban: str) -> str:
    """An IBAN with valid ISO 13616 check digits, printed in groups of four."""
    digits = "".join(str(int(c, 36)) for c in bban + country + "00")
    compact = f"{country}{98 - int(digits) % 97:02d}{bban}"
    return " ".join(compact[i:i + 4] for i in range(0, len(compact), 4))


@dataclass(frozen=True)
class Currency:
    code: str
    symbol: str
    example_grouping: str  # how vendors write 1234.5 in this currency, shown in the currency policy
    approval_threshold: int  # above this total a second approver signs off (approval policy)


CURRENCIES = {
    c.code: c
    for c in (
        Currency("EUR", "€", "1.234,50 € (DE), 1 234,50 € (FR), €1,234.50 (EN)", 5_000),
        Currency("USD", "$", "$1,234.50", 5_500),
        Currency("GBP", "£", "£1,234.50", 4_500),
        Currency("CHF", "CHF", "CHF 1'234.50", 5_000),
    )
}


@dataclass(frozen=True)
class Vendor:
    key: str  # slug: slice value and corpus file name
    name: str  # legal name: the label the workflow must output
    aliases: tuple[str, ...]
    street: str
    city: str  # postcode and city
    country: str
    vat_id: str
    iban: str
    bic: str
    currencies: tuple[str, ...]  # first one is the default
    payment_days: int
    language: str  # language of its invoices (some come in English anyway)
    number_format: str  # invoice number pattern: {year}, {yy}, {seq}
    vat_rate: Decimal
    items: tuple[tuple[str, int], ...]  # (description, unit price in whole currency units)


VENDORS = (
    Vendor("nordwind", "Nordwind Logistik GmbH", ("Nordwind", "Nordwind Logistik"), "Am Sandtorkai 41",
           "20457 Hamburg", "Germany", "DE284715093", iban("DE", "200400600528193047"), "COBADEFFXXX",
           ("EUR",), 30, "de", "NW-{year}-{seq:04d}", Decimal("0.19"),
           (("Palettentransport Hamburg-Berlin", 640), ("Lagerung pro Stellplatz/Monat", 38),
            ("Zollabfertigung", 185))),
    Vendor("lumiere", "Papeterie Lumière SARL", ("Lumière", "Papeterie Lumiere"), "12 rue de la République",
           "69002 Lyon", "France", "FR47812345678", iban("FR", "30004008190001234567835"), "BNPAFRPPXXX",
           ("EUR",), 45, "fr", "F{year}-{seq:03d}", Decimal("0.20"),
           (("Ramettes papier A4 80 g", 6), ("Classeurs à levier", 4), ("Enveloppes C5 (boîte de 500)", 29))),
    Vendor("helvetia", "Helvetia Präzisionswerkzeuge AG", ("Helvetia Tools", "Helvetia Präzision"),
           "Hardturmstrasse 161", "8005 Zürich", "Switzerland", "CHE-116.281.710 MWST",
           iban("CH", "002300A1023502601"), "UBSWCHZH80A", ("CHF", "EUR"), 30, "de", "HP/{yy}/{seq:04d}",
           Decimal("0.081"),
           (("Messschieber digital 150 mm", 189), ("Hartmetall-Fräser Satz", 742), ("Kalibrierservice", 260))),
    Vendor("acme", "Acme Office Supplies Ltd", ("ACME Office", "Acme Supplies"), "221 Old Street", "London EC1V 9NR",
           "United Kingdom", "GB293847561", iban("GB", "NWBK60161331926819"), "NWBKGB2LXXX", ("GBP",), 14, "en",
           "INV-{seq:06d}", Decimal("0.20"),
           (("Ergonomic office chair", 289), ("Printer toner, black", 74), ("Desk organiser set", 23))),
    Vendor("greenfield", "Greenfield Facility Services Ltd", ("Greenfield FS", "Greenfield Facilities"),
           "7 Quay Street", "Manchester M3 3JZ", "United Kingdom", "GB618204937",
           iban("GB", "BARC20000055779911"), "BARCGB22XXX", ("GBP",), 30, "en", "GFS{year}{seq:05d}",
           Decimal("0.20"),
           (("Office cleaning, monthly contract", 1450), ("Window cleaning", 320), ("Waste collection", 95))),
    Vendor("tulip", "Tulip Data Systems B.V.", ("Tulip Data", "TDS"), "Keizersgracht 520", "1017 EK Amsterdam",
           "Netherlands", "NL859214376B01", iban("NL", "INGB0001234567"), "INGBNL2AXXX", ("USD",), 30, "en",
           "TDS-{yy}-{seq:05d}", Decimal("0"),
           (("Analytics platform licence, annual", 4800), ("Support hours", 150), ("Data migration", 2100))),
    Vendor("cobalt", "Cobalt Cloud Services Ltd", ("Cobalt Cloud", "CCS"), "3 Grand Canal Square", "Dublin D02 P820",
           "Ireland", "IE6388047V", iban("IE", "AIBK93115212345678"), "AIBKIE2DXXX", ("USD", "EUR"), 15, "en",
           "CCS{year}-{seq:04d}", Decimal("0"),
           (("Compute credits", 900), ("Managed database, monthly", 410), ("Egress traffic (TB)", 85))),
)

CUSTOMER = "Meridian Trading GmbH, Friedrichstraße 100, 10117 Berlin"  # the buyer: a distractor, never the vendor
DUPLICATE_WINDOW_DAYS = 90

MONTHS = {
    "en": ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December"),
    "fr": ("janvier", "février", "mars", "avril", "mai", "juin", "juillet", "août", "septembre", "octobre",
           "novembre", "décembre"),
}

TERMS = {
    "en": {"invoice": "INVOICE", "number": "Invoice number", "date": "Invoice date", "due": "Due date",
           "total": "Total", "subtotal": "Subtotal", "vat": "VAT", "qty": "Qty", "item": "Description",
           "amount": "Amount", "currency": "Currency", "vendor": "Vendor", "bill_to": "Bill to", "vat_id": "VAT ID",
           "items": "Items"},
    "de": {"invoice": "RECHNUNG", "number": "Rechnungsnummer", "date": "Rechnungsdatum", "due": "Fällig am",
           "total": "Gesamtbetrag", "subtotal": "Zwischensumme", "vat": "MwSt.", "qty": "Menge",
           "item": "Beschreibung", "amount": "Betrag", "currency": "Währung", "vendor": "Lieferant",
           "bill_to": "Rechnungsempfänger", "vat_id": "USt-IdNr.", "items": "Positionen"},
    "fr": {"invoice": "FACTURE", "number": "Facture n°", "date": "Date", "due": "Échéance", "total": "Total TTC",
           "subtotal": "Total HT", "vat": "TVA", "qty": "Qté", "item": "Désignation", "amount": "Montant",
           "currency": "Devise", "vendor": "Fournisseur", "bill_to": "Client", "vat_id": "N° TVA",
           "items": "Articles"},
}

LETTERS = {
    "en": ("Dear Sir or Madam,\n\nplease find enclosed our invoice {number} dated {date} for {items}.",
           " The amount due is {total}.",
           " Please pay within {days} days (by {due}) to IBAN {iban}.\n\nKind regards,\n{name}"),
    "de": ("Sehr geehrte Damen und Herren,\n\nhiermit berechnen wir Ihnen mit Rechnung Nr. {number} vom {date}: "
           "{items}.",
           " Der Gesamtbetrag beläuft sich auf {total}.",
           " Zahlbar innerhalb von {days} Tagen (bis {due}) auf IBAN {iban}.\n\nMit freundlichen Grüßen\n{name}"),
    "fr": ("Madame, Monsieur,\n\nveuillez trouver ci-joint notre facture n° {number} du {date} pour : {items}.",
           " Le montant total s'élève à {total}.",
           " Payable sous {days} jours (avant le {due}) sur l'IBAN {iban}.\n\nCordialement,\n{name}"),
}


def format_date(day: date, language: str, country: str) -> str:
    if language == "de":
        return day.strftime("%d.%m.%Y")
    if language == "fr":
        return f"{day.day} {MONTHS['fr'][day.month - 1]} {day.year}"
    if country in ("United Kingdom", "Ireland"):
        return f"{day.day} {MONTHS['en'][day.month - 1]} {day.year}"
    return f"{MONTHS['en'][day.month - 1]} {day.day}, {day.year}"


def format_number(amount: Decimal, currency: str, language: str) -> str:
    """Digits grouped the way the vendor's locale writes them: 1.234,56 · 1 234,56 · 1,234.56 · 1'234.56."""
    plain = f"{amount:,.2f}"
    if currency == "CHF":
        return plain.replace(",", "'")
    separators = {"de": ".,", "fr": " ,"}.get(language, ",.")
    return plain.translate(str.maketrans(",.", separators))


def format_amount(amount: Decimal, currency: str, language: str) -> str:
    number = format_number(amount, currency, language)
    symbol = CURRENCIES[currency].symbol
    if currency == "CHF":
        return f"CHF {number}"
    if language in ("de", "fr"):
        return f"{number} {symbol}"
    return f"{symbol}{number}"


@dataclass(frozen=True)
class Invoice:
    vendor: Vendor
    number: str
    day: date
    currency: str
    language: str
    layout: str
    lines: tuple[tuple[str, int, Decimal], ...]  # description, quantity, line amount

    @property
    def net(self) -> Decimal:
        return sum((amount for _, _, amount in self.lines), Decimal(0))

    @property
    def vat(self) -> Decimal:
        return (self.net * self.vendor.vat_rate).quantize(CENT, ROUND_HALF_UP)

    @property
    def total(self) -> Decimal:
        return self.net + self.vat

    def labels(self) -> dict[str, str | float]:
        return {"vendor": self.vendor.name, "invoice_number": self.number, "date": self.day.isoformat(),
                "currency": self.currency, "total": float(self.total)}

    def slices(self) -> dict[str, str]:
        return {"vendor": self.vendor.key, "layout": self.layout, "currency": self.currency,
                "language": self.language}

    def render(self, *, with_total: bool = True) -> tuple[str, dict[str, str]]:
        """The invoice text, and the exact string each field appears as in it (to label a truncated copy)."""
        v, t = self.vendor, TERMS[self.language]
        due = self.day + timedelta(days=v.payment_days)
        money = lambda amount: format_amount(amount, self.currency, self.language)  # noqa: E731
        shown_date = format_date(self.day, self.language, v.country)
        if self.layout == "keyvalue":
            shown_date = self.day.isoformat()
            number = lambda amount: format_number(amount, self.currency, self.language)  # noqa: E731
            rows = [(t["vendor"], v.name), (t["vat_id"], v.vat_id), (t["number"], self.number),
                    (t["date"], shown_date), (t["due"], due.isoformat()), (t["currency"], self.currency),
                    (t["items"], "; ".join(f"{q} x {d}" for d, q, _ in self.lines)),
                    (t["subtotal"], number(self.net)), (f"{t['vat']} {v.vat_rate:.1%}", number(self.vat))]
            if with_total:
                rows.append((t["total"], number(self.total)))
            rows.append(("IBAN", v.iban))
            text = "\n".join(f"{key}: {value}" for key, value in rows)
            shown_total, shown_currency = number(self.total), self.currency
        elif self.layout == "table":
            width = 34
            body = [f"{d[:width]:<{width}} {q:>4} {money(a):>14}" for d, q, a in self.lines]
            sums = [(t["subtotal"], self.net), (f"{t['vat']} {v.vat_rate:.1%}", self.vat)]
            if with_total:
                sums.append((t["total"], self.total))
            text = "\n".join([
                v.name, f"{v.street}, {v.city}, {v.country}", f"{t['vat_id']} {v.vat_id}", "",
                f"{t['invoice']} {self.number}",
                f"{t['date']}: {shown_date}   {t['due']}: {format_date(due, self.language, v.country)}",
                f"{t['bill_to']}: {CUSTOMER}", "",
                f"{t['item']:<{width}} {t['qty']:>4} {t['amount']:>14}", *body,
                *(f"{label:<{width + 5}} {money(amount):>14}" for label, amount in sums),
                "", f"IBAN {v.iban} · BIC {v.bic}",
            ])
            shown_total, shown_currency = money(self.total), CURRENCIES[self.currency].symbol
        else:
            opening, amount_sentence, closing = LETTERS[self.language]
            items = ", ".join(f"{q} x {d}" for d, q, _ in self.lines)
            template = opening + (amount_sentence if with_total else "") + closing
            header = f"{v.name} · {v.street} · {v.city} · {t['vat_id']} {v.vat_id}\n{t['bill_to']}: {CUSTOMER}\n\n"
            text = header + template.format(number=self.number, date=shown_date, items=items,
                                            total=money(self.total), days=v.payment_days,
                                            due=format_date(due, self.language, v.country), iban=v.iban, name=v.name)
            shown_total, shown_currency = money(self.total), CURRENCIES[self.currency].symbol
        shown = {"vendor": v.name, "invoice_number": self.number, "date": shown_date, "currency": shown_currency,
                 "total": shown_total}
        return text + "\n", shown


def make_invoice(rng: random.Random, vendor: Vendor, layout: str, seq: int) -> Invoice:
    day = date(2024, 1, 1) + timedelta(days=rng.randrange(366))
    currency = vendor.currencies[0] if rng.random() < 0.75 else rng.choice(vendor.currencies)
    language = vendor.language if vendor.language == "en" or rng.random() < 0.75 else "en"
    picked = rng.sample(vendor.items, rng.randint(1, min(3, len(vendor.items))))
    lines = tuple((desc, qty, Decimal(price * qty)) for desc, price in picked
                  for qty in [rng.randint(1, max(1, min(12, 2500 // price)))])
    number = vendor.number_format.format(year=day.year, yy=f"{day.year % 100:02d}", seq=seq)
    return Invoice(vendor, number, day, currency, language, layout, lines)


@dataclass(frozen=True)
class Example:
    id: str
    content: bytes
    labels: dict[str, str | float | None] | None
    slices: dict[str, str]


def malformed(kind: str, rng: random.Random, invoice: Invoice) -> tuple[bytes, dict | None, dict[str, str]]:
    """A broken input, its labels (only the fields it still shows) and its slices (only what is known)."""
    if kind == "empty":
        return b"", None, {"quality": kind}
    if kind == "garbage":  # a PDF saved under .txt: binary, not UTF-8
        return b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n" + rng.randbytes(160) + b"\xff\xfe\xfd", None, {"quality": kind}
    text, shown = invoice.render(with_total=kind != "missing-total")
    if kind == "truncated":
        text = text[: len(text) * 2 // 5]
    labels = {f: (value if shown[f] in text else None) for f, value in invoice.labels().items()}
    return text.encode(), labels, {**invoice.slices(), "quality": kind}


def generate(seed: int = DEFAULT_SEED, count: int = DEFAULT_COUNT) -> list[Example]:
    """``count`` examples: every vendor and layout evenly, the four malformed kinds at random positions."""
    if count < len(MALFORMED) + 1:
        raise ValueError(f"--count must be at least {len(MALFORMED) + 1} (one of each malformed kind and one good)")
    rng = random.Random(seed)
    broken = dict(zip(rng.sample(range(count), len(MALFORMED)), MALFORMED, strict=True))
    vendors = [VENDORS[i % len(VENDORS)] for i in range(count)]
    layouts = [LAYOUTS[i % len(LAYOUTS)] for i in range(count)]
    rng.shuffle(vendors)
    rng.shuffle(layouts)
    examples = []
    for index, (vendor, layout) in enumerate(zip(vendors, layouts, strict=True)):
        invoice = make_invoice(rng, vendor, layout, seq=rng.randrange(1, 9999))
        ident = f"inv-{index + 1:04d}"
        if index in broken:
            content, labels, slices = malformed(broken[index], rng, invoice)
        else:
            text, _ = invoice.render()
            content, labels, slices = text.encode(), invoice.labels(), {**invoice.slices(), "quality": "ok"}
        examples.append(Example(ident, content, labels, slices))
    return examples


def vendor_document(v: Vendor) -> str:
    currencies = ", ".join(v.currencies)
    number_format = re.sub(r"\{(\w+)(:[^}]*)?\}", r"<\1>", v.number_format)
    return f"""---
doc_type: vendor
vendor: {v.name}
---
# {v.name}

Vendor master data. Invoices from this vendor must name it as **{v.name}** (legal name),
whatever name is printed on the letterhead.

- Legal name: {v.name}
- Also known as: {", ".join(v.aliases)}
- Address: {v.street}, {v.city}, {v.country}
- VAT id: {v.vat_id}
- IBAN: {v.iban} (BIC {v.bic})
- Default currency: {v.currencies[0]} (invoices accepted in: {currencies})
- Payment terms: net {v.payment_days} days
- Invoice number format: {number_format}
- Invoice language: {v.language}
"""


def policy_documents() -> dict[str, str]:
    thresholds = "\n".join(f"| {c.code} | {c.approval_threshold:,} |" for c in CURRENCIES.values())
    formats = "\n".join(f"| {c.code} | {c.symbol} | {c.example_grouping} |" for c in CURRENCIES.values())
    return {
        "approval-thresholds": f"""---
doc_type: policy
vendor: ""
---
# Invoice approval thresholds

An invoice is posted automatically only when every field was extracted with confidence. Its
total then decides the approval path in the ERP: at or below the threshold for its currency it is
released for payment at once; above it, the posting carries `dual_approval: true` and a second
approver from finance signs off before payment.

| Currency | Released at once up to (total, incl. VAT) |
|---|---|
{thresholds}

An invoice that does not state its total, or whose vendor is not in the vendor master data, is
never posted automatically: it goes to review.
""",
        "duplicate-invoices": f"""---
doc_type: policy
vendor: ""
---
# Duplicate invoice policy

An invoice is a duplicate when the same vendor (legal name) sent the same invoice number within
{DUPLICATE_WINDOW_DAYS} days, even if the total differs. Duplicates are never posted; the run is parked for
review with the first posting's reference. A reminder ("Zahlungserinnerung", "relance") that repeats
an invoice number is not a new invoice.

The posting step's idempotency key makes a retried post of the same run harmless; this policy is
about the vendor sending the same invoice twice.
""",
        "currency-policy": f"""---
doc_type: policy
vendor: ""
---
# Currency policy

Invoices are accepted in {", ".join(CURRENCIES)} only. Record the currency as its ISO 4217 code,
never as a symbol, and the total as a plain number with two decimals (1234.50). Vendors write
amounts in their own conventions:

| Code | Symbol | How amounts are written |
|---|---|---|
{formats}

A comma followed by exactly two digits at the end of an amount is the decimal separator in
German and French invoices. An invoice in another currency goes to review.
""",
    }


def write(examples: list[Example], out: Path) -> None:
    invoices = out / "invoices"
    invoices.mkdir(parents=True, exist_ok=True)
    keep = {f"{e.id}.txt" for e in examples}
    for stale in invoices.glob("inv-*.txt"):  # a smaller --count must not leave old inputs behind
        if stale.name not in keep:
            stale.unlink()
    lines = []
    for e in examples:
        (invoices / f"{e.id}.txt").write_bytes(e.content)
        lines.append(json.dumps({"id": e.id, "input": f"invoices/{e.id}.txt", "labels": e.labels,
                                 "slices": e.slices}, ensure_ascii=False))
    (out / "labels.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_corpus(corpus: Path) -> list[Path]:
    documents = {f"vendor-{v.key}": vendor_document(v) for v in VENDORS}
    documents.update(policy_documents())
    corpus.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in documents.items():
        path = corpus / f"{name}.md"
        path.write_text(text, encoding="utf-8")
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="same seed, same files (default %(default)s)")
    parser.add_argument("--count", type=int, default=DEFAULT_COUNT, help="invoices to write (default %(default)s)")
    parser.add_argument("--out", type=Path, default=HERE,
                        help="folder for invoices/ and labels.jsonl (default: this example's folder)")
    parser.add_argument("--corpus", type=Path, default=None,
                        help="folder for the vendor and policy documents (default: <out>/corpus)")
    args = parser.parse_args(argv)
    try:
        examples = generate(args.seed, args.count)
    except ValueError as exc:
        parser.error(str(exc))
    write(examples, args.out)
    corpus = write_corpus(args.corpus or args.out / "corpus")
    print(f"wrote {len(examples)} invoices and {args.out / 'labels.jsonl'}; {len(corpus)} corpus documents")


if __name__ == "__main__":
    main()
