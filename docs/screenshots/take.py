"""Take the README's screenshots: `.venv/bin/python docs/screenshots/take.py`.

A throwaway server on a fresh SQLite file, with a stand-in speech server that answers a
one-second tone, a customer who has a key, a payment and some usage, and Debian's Chromium
(through Playwright) at 1280×800 and 390×844. Writes docs/screenshots/<page>-<width>.png;
look at each before committing them.
"""

import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))

from playwright.sync_api import expect, sync_playwright  # noqa: E402

from tests import factories  # noqa: E402
from tests.conftest import _migrate, app_config  # noqa: E402
from tests.fake_upstream import FakeUpstream  # noqa: E402
from tests.servers import serve  # noqa: E402
from tests.test_browser import CHROMIUM, CHROMIUM_ARGS, WIDTHS, a_second_of_sound, sign_in  # noqa: E402

PASSWORD = "correct horse battery"


def main() -> None:
    from app import billing, create_app
    from app.extensions import db

    with tempfile.TemporaryDirectory() as scratch, serve(FakeUpstream(chunks=[a_second_of_sound()])) as upstream:
        uri = f"sqlite:///{scratch}/screenshots.sqlite3"
        _migrate(uri)
        app = create_app(
            app_config(uri, UPSTREAM_URL=f"{upstream}/v1", TRUSTED_HOSTS=["127.0.0.1"], SIGNUP_CREDITS=1000)
        )
        customer = factories.customer(app, balance=9000, password=PASSWORD)
        factories.charged(app, customer.team_id, count=4, characters=180)
        with app.app_context():
            factories.starter_payment(customer.team_id, "cs_test_screens", status="paid")
            team = db.session.get(factories.Team, customer.team_id)
            billing.grant(team, 1000, "Welcome credits")
            # A saved card and automatic top-up on, as the billing page shows them.
            team.stripe_customer_id, team.card_payment_method = "cus_screens", "pm_screens"
            team.card_brand, team.card_last4, team.card_expires = "visa", "4242", "12/2030"
            team.auto_topup_below, team.auto_topup_pack, team.auto_topup_monthly_limit = 2000, "starter", 4
            team.auto_topup_by_id = customer.user_id
            db.session.commit()
        with serve(app) as site, sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            for width, viewport in WIDTHS.items():
                page = browser.new_page(viewport=viewport, is_mobile=width == "phone", has_touch=True)
                page.goto(site)
                page.locator("[data-player]").first.get_by_role("button").click()
                expect(page.locator("[data-player] progress").first).to_have_js_property("value", 100)
                page.screenshot(path=HERE / f"landing-{width}.png", full_page=True)
                sign_in(page, site, customer.email, PASSWORD)
                page.goto(f"{site}/playground")
                page.select_option("#format", "wav")  # the stand-in's tone is WAV
                page.click("#play")
                expect(page.locator("#playground-status")).to_contain_text("Done")
                page.screenshot(path=HERE / f"playground-{width}.png", full_page=True)
                for name in ("keys", "billing", "usage"):
                    page.goto(f"{site}/{name}")
                    page.screenshot(path=HERE / f"{name}-{width}.png", full_page=True)
                page.close()
            browser.close()


if __name__ == "__main__":
    main()
