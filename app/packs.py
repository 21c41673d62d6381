"""The credit packs on sale (CREDIT_PACKS): what each gives and costs, parsed once at start."""

from dataclasses import dataclass


@dataclass(frozen=True)
class Pack:
    id: str
    credits: int
    price_cents: int

    @property
    def price(self) -> str:
        return f"{self.price_cents / 100:,.2f}"


def parse_packs(raw: str) -> list[Pack]:
    """`id:credits:price_cents, …` → packs. Raises ValueError, so a bad setting fails at start-up."""
    packs = []
    for item in filter(None, (part.strip() for part in raw.split(","))):
        try:
            pack_id, credits, price = item.split(":")
            pack = Pack(pack_id.strip(), int(credits), int(price))
        except ValueError:
            raise ValueError(f"CREDIT_PACKS entry {item!r} is not id:credits:price_cents") from None
        if not pack.id or pack.credits <= 0 or pack.price_cents <= 0:
            raise ValueError(f"CREDIT_PACKS entry {item!r} needs a name and positive numbers")
        packs.append(pack)
    return packs


def named(packs: list[Pack], pack_id: str | None) -> Pack | None:
    """The pack of `packs` with this id; None when none is (sold no more, or never)."""
    return next((pack for pack in packs if pack.id == pack_id), None)
