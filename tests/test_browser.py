"""End to end in a real headless Chromium (Debian's), driven by Playwright.

Sign up, create a key and read it off the page, call the API with it, buy a pack
(the redirect to Stripe is intercepted), deliver the signed webhook, see the
new balance, revoke the key. Screenshots of each page go to test-artifacts/.
"""

import os
import re
import shutil
from pathlib import Path
from unittest.mock import ANY

import pytest
import responses
from playwright.sync_api import expect, sync_playwright

from tests import factories
from tests.conftest import STRIPE_CHECKOUT
from tests.fake_upstream import FakeUpstream
from tests.servers import serve
from tests.stripe_helpers import checkout_session, deliver, event, stub_checkout

pytestmark = pytest.mark.browser


CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture
def browser():
    if not shutil.which(CHROMIUM):
        if os.environ.get("CI"):
            pytest.fail("CI must install Debian's chromium (see .ci/run)")
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def app(make_app):
    # The docs page shows this server's address only when the Host header is checked.
    return make_app(TRUSTED_HOSTS=["127.0.0.1", "localhost"], DEV_OUTBOX=True)


@pytest.fixture
def site(app):
    with serve(app) as url:
        yield url


def shot(page, name, database_uri):
    backend = database_uri.split(":", 1)[0].split("+")[0]
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=ARTIFACTS / f"{backend}-{name}.png", full_page=True)


def api_call(page, path, secret):
    """The reference's JavaScript `fetch`, run in the page."""
    return page.evaluate(
        """async ([path, key]) => {
            const res = await fetch(path, {headers: {"Authorization": "Bearer " + key}});
            return {status: res.status, body: await res.json()};
        }""",
        [path, secret],
    )


def test_a_customer_signs_up_creates_a_key_buys_credits_and_revokes(app, site, browser, database_uri):
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    page = context.new_page()
    errors = []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)

    page.goto(f"{site}/signup")
    shot(page, "1-signup", database_uri)
    page.fill("#email", "browser@example.com")
    page.fill("#password", "correct horse battery")
    page.fill("#confirm", "correct horse battery")
    page.click("button[type=submit]")
    expect(page.locator("h1")).to_have_text("Check your inbox")
    # No mail server here: the development outbox holds the verification mail, and its link works.
    page.click("text=development outbox")
    shot(page, "1b-outbox", database_uri)
    page.click("a[href*='/verify/']")
    page.wait_for_url(f"{site}/login")
    expect(page.locator(".flash.success")).to_contain_text("Your email is confirmed")
    page.fill("#email", "browser@example.com")
    page.fill("#password", "correct horse battery")
    page.click("button[type=submit]")
    page.wait_for_url(f"{site}/")
    page.goto(f"{site}/keys")

    page.fill("#name", "e2e laptop")
    page.click("text=Create key")
    page.wait_for_url(f"{site}/keys/created")
    secret = page.inner_text("#new-key").strip()
    assert re.fullmatch(r"kp_live_[A-Za-z0-9_-]{43}", secret)
    page.click("[data-copy]")
    expect(page.locator("[data-copy]")).to_have_text(re.compile("Copied|Selected: press Ctrl\\+C"))
    shot(page, "2-key-created", database_uri)

    assert api_call(page, "/v1/balance", secret) == {
        "status": 200,
        "body": {"balance": 0, "unlimited": False, "key": ANY},
    }

    # Reloading does not show the key again.
    page.reload()
    assert secret not in page.content() and "shown only once" in page.content()
    shot(page, "3-keys", database_uri)

    page.goto(f"{site}/billing")
    shot(page, "4-billing", database_uri)
    checkout_pages = []
    page.route(
        f"{STRIPE_CHECKOUT}/**",
        lambda route: (
            checkout_pages.append(route.request.url),
            route.fulfill(status=200, content_type="text/html", body="<h1>Stripe Checkout (stand-in)</h1>"),
        ),
    )
    with responses.RequestsMock() as stripe_api:
        stub_checkout(stripe_api, "cs_test_browser")
        page.click("text=Buy starter")
        page.wait_for_url(f"{STRIPE_CHECKOUT}/c/pay/cs_test_browser")
    assert checkout_pages == [f"{STRIPE_CHECKOUT}/c/pay/cs_test_browser"]

    # Back from Stripe before the webhook: the success page waits.
    page.goto(f"{site}/billing/success?session_id=cs_test_browser")
    assert page.get_attribute("#payment-state", "data-state") == "pending"
    shot(page, "5-confirming", database_uri)

    team_id = _team_id(app, "browser@example.com")
    payload = event("checkout.session.completed", checkout_session(team_id, session_id="cs_test_browser"))
    assert deliver(app.test_client(), payload).status_code == 200

    # The page refreshes by itself and shows the credited balance.
    page.wait_for_selector("#payment-state[data-state=credited]", timeout=10_000)
    assert "10,000" in page.inner_text("#balance")
    shot(page, "6-credited", database_uri)
    assert api_call(page, "/v1/balance", secret)["body"] == {"balance": 10000, "unlimited": False, "key": ANY}

    page.goto(f"{site}/")
    assert "10,000" in page.inner_text("#balance") and "topup" in page.content()
    shot(page, "7-overview", database_uri)

    page.goto(f"{site}/keys")
    page.click("text=Revoke")
    page.click("button:has-text('Revoke key')")
    page.wait_for_url(f"{site}/keys")
    assert "revoked" in page.inner_text("#keys")
    assert api_call(page, "/v1/balance", secret)["status"] == 401

    page.goto(f"{site}/docs")
    assert f"curl {site}/v1/audio/speech" in page.inner_text("#curl-example")
    shot(page, "8-docs", database_uri)

    # Small screens get the same pages, laid out for them.
    page.set_viewport_size({"width": 390, "height": 800})
    page.goto(f"{site}/")
    shot(page, "9-overview-mobile", database_uri)
    # The only failed load is the deliberate call with the revoked key.
    assert [error for error in errors if "401" not in error] == []
    context.close()


def _user_id(app, email):
    from app import accounts

    with app.app_context():
        return accounts.find_by_email(email).id


def _team_id(app, email):
    """The id of the personal team of the account with this email: the team that pays."""
    return factories.team_of(app, _user_id(app, email))


def other_origin_page(environ, start_response):
    """A page of someone else's site, on a second loopback origin."""
    start_response("200 OK", [("Content-Type", "text/html")])
    return [b"<!doctype html><title>a customer's web app</title>"]


@pytest.mark.parametrize("allowed", [True, False], ids=["allowed", "not allowed"])
def test_a_page_on_another_origin_calls_the_api_only_when_the_operator_allows_it(
    make_app, browser, upstream_for_browser, allowed
):
    with serve(other_origin_page) as origin:
        app = make_app(UPSTREAM_URL=f"{upstream_for_browser}/v1", CORS_ALLOWED_ORIGINS=[origin] if allowed else [])
        customer = factories.customer(app, balance=1000)
        with serve(app) as api:
            page = browser.new_page()
            page.goto(origin)
            result = page.evaluate(
                """async ([api, key]) => {
                    try {
                        const res = await fetch(api + "/v1/audio/speech", {
                            method: "POST",
                            headers: {"Authorization": "Bearer " + key, "Content-Type": "application/json"},
                            body: JSON.stringify({input: "Hello from another site.", voice: "af_sky"}),
                        });
                        const audio = await res.arrayBuffer();
                        const charged = res.headers.get("X-Credits-Charged");
                        return {status: res.status, bytes: audio.byteLength, charged};
                    } catch (error) {
                        return {error: String(error)};
                    }
                }""",
                [api, customer.secret],
            )
            page.close()
    if allowed:
        assert result["status"] == 200 and result["bytes"] > 0 and result["charged"] == "24"
        assert factories.balance(app, customer.team_id) == 1000 - 24
    else:
        # The preflight is refused, so the browser never sends the request: nothing is charged.
        assert "Failed to fetch" in result["error"]
        assert factories.speech_requests(app, customer.team_id) == []


@pytest.fixture
def upstream_for_browser():
    with serve(FakeUpstream()) as url:
        yield url


AXE = Path(__file__).resolve().parent / "browser" / "node_modules" / "axe-core" / "axe.min.js"
WIDTHS = {"desktop": {"width": 1280, "height": 800}, "phone": {"width": 390, "height": 844}}
PUBLIC_PAGES = {"landing": "/", "pricing": "/pricing", "docs": "/docs", "sign-in": "/login", "sign-up": "/signup"}
PUBLIC_PAGES["forgot"] = "/forgot"
CUSTOMER_PAGES = {
    "overview": "/",
    "keys": "/keys",
    "playground": "/playground",
    "usage": "/usage",
    "ledger": "/ledger",
    "billing": "/billing",
    "account": "/account",
    "team": "/team",
    "docs-signed-in": "/docs",
}

# Every action on the page, scrolled to in turn: on screen, inside the width, and the thing a tap there hits.
UNREACHABLE_ACTIONS = """() => {
    const missed = [];
    const actions = document.querySelectorAll(
        "a[href], button, input:not([type=hidden]), select, textarea, audio[controls]");
    for (const element of actions) {
        if (!element.getClientRects().length || getComputedStyle(element).visibility === "hidden") continue;
        if (element.closest(".skip")) continue;  // shown when focused, by design
        element.scrollIntoView({block: "center", inline: "center"});
        const box = element.getBoundingClientRect();
        const hit = document.elementFromPoint(box.left + box.width / 2, box.top + box.height / 2);
        const inside = box.left >= -1 && box.right <= window.innerWidth + 1 && box.width > 0;
        const reached = hit && (
            element.contains(hit) || hit.contains(element) || hit.closest("label")?.contains(element));
        if (!inside || !reached) missed.push(element.outerHTML.slice(0, 120));
    }
    window.scrollTo(0, 0);
    return missed;
}"""


def sign_in(page, site, email, password="correct horse battery"):
    page.goto(f"{site}/login")
    page.fill("#email", email)
    page.fill("#password", password)
    page.click("main button[type=submit]")
    page.wait_for_url(f"{site}/")


def check_page(page, name, width, database_uri):
    """A screenshot; the page fits the width, has one h1, every action can be tapped, axe finds nothing serious."""
    wide = page.evaluate(
        """(width) => [...document.querySelectorAll("body *")]
            .filter((e) => e.getBoundingClientRect().right > width + 1)
            .map((e) => `${e.tagName}.${e.className}: ${e.textContent.slice(0, 40)}`)""",
        WIDTHS[width]["width"],
    )
    assert page.evaluate("document.documentElement.scrollWidth") <= WIDTHS[width]["width"], f"{name}: {wide}"
    assert page.locator("h1").count() == 1, f"{name} has {page.locator('h1').count()} h1"
    shot(page, f"{width}-{name}", database_uri)
    if width == "phone" and page.locator(".menu-toggle").is_visible():
        page.tap(".menu-toggle")
        expect(page.locator("#site-nav")).to_be_visible()
    assert page.evaluate(UNREACHABLE_ACTIONS) == [], f"{name} at {width}: actions out of reach"
    page.evaluate(AXE.read_text())
    violations = page.evaluate(AXE_FINDINGS)
    assert violations == [], f"{name} at {width}: {violations}"


# axe's serious and critical violations, and the text whose contrast axe measured but filed as
# "incomplete" rather than failed: axe files text drawn in its own background's colour (1:1, the
# invisible "Sign up" button) as incomplete, on the theory that it might be meant to be hidden.
AXE_FINDINGS = """async () => {
    const results = await axe.run(document, {resultTypes: ["violations", "incomplete"]});
    const serious = results.violations
        .filter((v) => v.impact === "serious" || v.impact === "critical")
        .map((v) => `${v.id}: ${v.nodes.map((n) => n.target.join(" ")).join(", ")}`);
    const measured = results.incomplete
        .filter((result) => result.id === "color-contrast")
        .flatMap((result) => result.nodes)
        .filter((node) => node.any.some(({data}) => data && (data.messageKey === "equalRatio"
            || (data.contrastRatio > 0 && data.contrastRatio < data.expectedContrastRatio))))
        .map((node) => `color-contrast (measured, filed incomplete): ${node.target.join(" ")}`);
    return [...serious, ...measured];
}"""


@pytest.fixture
def furnished(make_app, upstream_for_browser):
    """A server with a customer who has a key, a payment, usage and ledger entries; yields (app, url, email)."""
    from app import billing
    from app.extensions import db

    app = make_app(UPSTREAM_URL=f"{upstream_for_browser}/v1", TRUSTED_HOSTS=["127.0.0.1", "localhost"])
    customer = factories.customer(app, balance=5000, password="correct horse battery")
    factories.charged(app, customer.team_id, count=3, characters=120)
    with app.app_context():
        factories.starter_payment(customer.team_id, "cs_test_pages", status="paid")
        billing.grant(db.session.get(factories.Team, customer.team_id), 250, "A welcome gift from the operator")
        db.session.commit()
    with serve(app) as url:
        yield app, url, customer.email


@pytest.mark.parametrize("width", WIDTHS)
def test_every_page_fits_the_screen_every_action_can_be_tapped_and_axe_finds_nothing_serious(
    browser, furnished, width, database_uri
):
    app, site, email = furnished
    context = browser.new_context(viewport=WIDTHS[width], has_touch=True, is_mobile=width == "phone")
    page = context.new_page()
    for name, path in PUBLIC_PAGES.items():
        page.goto(site + path)
        check_page(page, name, width, database_uri)
    # The page after signing up, still on the "Sign up" entry.
    page.goto(f"{site}/signup")
    page.fill("#email", "newcomer@example.com")
    page.fill("#password", "correct horse battery")
    page.fill("#confirm", "correct horse battery")
    page.click("main button[type=submit]")
    expect(page.locator("h1")).to_have_text("Check your inbox")
    check_page(page, "check-inbox", width, database_uri)
    sign_in(page, site, email)
    for name, path in CUSTOMER_PAGES.items():
        page.goto(site + path)
        check_page(page, name, width, database_uri)
    # The balance banners: low (a threshold above the balance), then empty.
    team_id = _team_id(app, email)
    with app.app_context():
        from app import billing
        from app.extensions import db

        team = db.session.get(factories.Team, team_id)
        team.low_balance_credits = 1_000_000
        db.session.commit()
        for name in ("low", "empty"):
            if name == "empty":
                billing.deduct(team, team.balance, "to empty it")
                db.session.commit()
            page.goto(f"{site}/account")
            expect(page.locator("#balance-banner")).to_contain_text(name)
            check_page(page, f"account-balance-{name}", width, database_uri)
    # The page a new key is shown on, once.
    page.goto(f"{site}/keys")
    page.fill("#name", "checked")
    page.click("text=Create key")
    page.wait_for_url(f"{site}/keys/created")
    check_page(page, "key-created", width, database_uri)
    # The header folds on a phone: the menu opens with a tap and its links work.
    if width == "phone":
        page.goto(f"{site}/keys")
        expect(page.locator("#site-nav")).to_be_hidden()
        page.tap(".menu-toggle")
        page.tap("#site-nav >> text=Usage")
        page.wait_for_url(f"{site}/usage")
        expect(page.locator("nav a[aria-current=page]")).to_have_text("Usage")
    context.close()


def test_the_playground_shows_the_cost_plays_and_updates_the_balance(browser, furnished, database_uri):
    app, site, email = furnished
    page = browser.new_page(viewport=WIDTHS["desktop"])
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    sign_in(page, site, email)
    team_id = _team_id(app, email)
    with app.app_context():
        from app.extensions import db

        # A threshold above the balance, so the low-balance banner shows the balance too.
        db.session.get(factories.Team, team_id).low_balance_credits = 1_000_000
        db.session.commit()
    page.goto(f"{site}/playground")
    page.fill("#input", "Hello from the playground, héllo 👋")
    expect(page.locator("#cost-credits")).to_have_text("34")  # code points, as the API counts
    page.select_option("#voice", "bm_george")
    page.select_option("#format", "wav")
    before = factories.balance(app, team_id)
    expect(page.locator("#balance-banner")).to_contain_text(f"{before:,} credits left")
    page.click("#play")
    expect(page.locator("#playground-status")).to_contain_text("Charged 34 credits")
    expect(page.locator("#balance")).to_have_text(f"{before - 34:,}")
    # Every balance on the page says the same.
    expect(page.locator("#balance-banner")).to_contain_text(f"{before - 34:,} credits left")
    # A WAV plays once the whole file is in: the player has it when the status says done (not before).
    expect(page.locator("#playground-status")).to_contain_text("Done.")
    assert page.get_attribute("#player", "src").startswith("blob:")
    shot(page, "desktop-playground-played", database_uri)
    # A request the balance cannot cover says so, and charges nothing.
    with app.app_context():
        from app import billing
        from app.extensions import db

        billing.deduct(db.session.get(factories.Team, team_id), before - 34 - 10, "leave 10")
        db.session.commit()
    page.click("#play")
    expect(page.locator("#playground-status")).to_contain_text("Insufficient credits")
    assert factories.balance(app, team_id) == 10
    assert errors == []
    page.close()


ADMIN_PAGES = {
    "admin-totals": "/admin",
    "admin-customers": "/admin/users?q=customer",
    "admin-teams": "/admin/teams?q=customer",
    "admin-payments": "/admin/payments",
    "admin-charged": "/admin/charged",
    "admin-audit": "/admin/audit",
    "admin-log": "/admin/log",
}


@pytest.mark.parametrize("width", WIDTHS)
def test_an_admin_grants_credits_and_disables_an_account_in_the_browser(browser, furnished, width, database_uri):
    app, site, email = furnished
    runner = app.test_cli_runner()
    runner.invoke(args=["users", "create", "boss@example.com", "--password", "correct horse battery", "--admin"])
    user_id = _user_id(app, email)
    context = browser.new_context(viewport=WIDTHS[width], has_touch=True, is_mobile=width == "phone")
    page = context.new_page()
    sign_in(page, site, "boss@example.com")
    for name, path in ADMIN_PAGES.items():
        page.goto(site + path)
        check_page(page, name, width, database_uri)

    page.goto(f"{site}/admin/users?q={email}")
    page.click(f"text={email}")
    # The customer's page, loaded with its stylesheet, before it is measured (a click only starts the navigation).
    page.wait_for_url(f"{site}/admin/users/{user_id}")
    page.wait_for_load_state("load")
    check_page(page, "admin-customer", width, database_uri)
    team_id = factories.team_of(app, user_id)
    page.click(f"text={team_id}: Personal")
    page.wait_for_url(f"{site}/admin/teams/{team_id}")
    page.wait_for_load_state("load")
    check_page(page, "admin-team", width, database_uri)
    before = factories.balance(app, team_id)
    page.check("input[value=grant]")
    page.fill("#amount", "1234")
    page.fill("#reason", "Refund for a bad day")
    page.click("text=Apply")
    expect(page.locator(".flash.success")).to_contain_text("Granted 1,234 credits")
    assert factories.balance(app, team_id) == before + 1234
    page.goto(f"{site}/admin/users/{user_id}")
    page.click("text=Disable account")
    expect(page.locator(".flash.success")).to_contain_text("disabled")
    page.goto(f"{site}/admin/log")
    expect(page.locator("#admin-log")).to_contain_text("Refund for a bad day")
    expect(page.locator("#admin-log")).to_contain_text("disable")
    context.close()


@pytest.mark.parametrize("width", WIDTHS)
def test_an_owner_invites_a_developer_who_joins_from_the_mail(app, site, browser, width, database_uri):
    owner_email = factories.customer(app, password="correct horse battery").email
    owner = browser.new_context(viewport=WIDTHS[width], has_touch=True, is_mobile=width == "phone").new_page()
    sign_in(owner, site, owner_email)
    owner.goto(f"{site}/team")
    check_page(owner, "team-personal", width, database_uri)
    owner.fill("#name", "Acme Sound")
    owner.click("text=Make the team")
    owner.wait_for_url(f"{site}/team")
    expect(owner.locator("[data-team]")).to_have_text("Acme Sound")
    owner.fill("#email", "dev@example.com")
    owner.select_option("#role", "developer")
    owner.click("text=Send invitation")
    expect(owner.locator(".flash.success")).to_contain_text("We mailed an invitation to dev@example.com")
    expect(owner.locator("#invitations")).to_contain_text("dev@example.com")
    check_page(owner, "team-invited", width, database_uri)

    # The invitee opens the mail's link in a browser of their own and makes an account with it.
    invitee = browser.new_context(viewport=WIDTHS[width], has_touch=True, is_mobile=width == "phone").new_page()
    invitee.goto(site + factories.mail_link(app, "dev@example.com", "invitation"))
    expect(invitee.locator("h1")).to_have_text("Join Acme Sound")
    check_page(invitee, "invitation", width, database_uri)
    invitee.fill("#password", "correct horse battery")
    invitee.fill("#confirm", "correct horse battery")
    invitee.click("text=Make my account and join")
    invitee.wait_for_url(f"{site}/")
    expect(invitee.locator(".flash.success")).to_contain_text("Welcome to Acme Sound: you are developer here.")
    expect(invitee.locator("[data-team]")).to_have_text("Acme Sound")
    check_page(invitee, "overview-as-developer", width, database_uri)
    # A developer's menu has no "Buy credits"; their keys spend the team's balance.
    assert invitee.locator("#site-nav >> text=Buy credits").count() == 0

    owner.reload()
    expect(owner.locator("#members")).to_contain_text("dev@example.com")
    expect(owner.locator("#invitations")).to_contain_text("No invitation is waiting")
    check_page(owner, "team-members", width, database_uri)
    owner.context.close()
    invitee.context.close()


def box(page, selector):
    return page.locator(selector).first.bounding_box()


def test_a_price_stands_out_and_a_buy_button_stands_apart_from_it(make_app, browser):
    app = make_app(STRIPE_SECRET_KEY=None)  # no payments yet: the Buy buttons are disabled
    customer = factories.customer(app, balance=5000, password="correct horse battery")
    with serve(app) as site:
        page = browser.new_page(viewport=WIDTHS["desktop"])
        page.goto(f"{site}/pricing")
        price = page.locator(".pack .price").first
        assert price.evaluate("(e) => parseFloat(getComputedStyle(e).fontSize)") >= 24
        muted = page.evaluate("getComputedStyle(document.querySelector('.muted')).color")
        assert price.evaluate("(e) => getComputedStyle(e).color") != muted
        sign_in(page, site, customer.email)
        page.goto(f"{site}/billing")
        expect(page.locator(".pack button").first).to_be_disabled()
        above = box(page, ".pack .per-thousand")
        assert box(page, ".pack button")["y"] - (above["y"] + above["height"]) >= 12
        page.close()


def test_the_usage_charts_labels_can_be_read_on_a_phone(browser, furnished):
    app, site, email = furnished
    page = browser.new_page(viewport=WIDTHS["phone"], is_mobile=True, has_touch=True)
    sign_in(page, site, email)
    page.goto(f"{site}/usage")
    heights = page.eval_on_selector_all(".chart text", "(all) => all.map((t) => t.getBoundingClientRect().height)")
    assert heights and min(heights) >= 11, heights
    page.close()


def test_the_admins_totals_per_day_stay_a_table_on_a_phone(browser, furnished):
    app, site, email = furnished
    app.test_cli_runner().invoke(
        args=["users", "create", "boss@example.com", "--password", "correct horse battery", "--admin"]
    )
    page = browser.new_page(viewport=WIDTHS["phone"], is_mobile=True, has_touch=True)
    sign_in(page, site, "boss@example.com")
    page.goto(f"{site}/admin")
    # 30 days: one line each, not 30 stacks of six labelled zeros (4,400 px).
    assert box(page, "#totals")["height"] < 1400
    assert page.evaluate("document.documentElement.scrollWidth") <= WIDTHS["phone"]["width"]
    page.close()


@pytest.mark.parametrize("width", WIDTHS)
def test_the_docs_headings_break_between_words_only(app, site, browser, width):
    page = browser.new_page(viewport=WIDTHS[width])
    page.goto(f"{site}/docs")
    # Were breaking inside a word not allowed, would any heading overflow its box?
    overflowing = page.eval_on_selector_all(
        ".docs h2, .docs h1",
        """(all) => all.filter((h) => {
            h.style.overflowWrap = "normal";
            h.style.wordBreak = "normal";
            return h.scrollWidth > h.clientWidth + 1;
        }).map((h) => h.textContent)""",
    )
    assert overflowing == []
    page.close()


def test_the_balance_banner_is_as_wide_as_the_narrow_card_below_it(make_app, browser):
    app = make_app(LOW_BALANCE_CREDITS=1000)
    customer = factories.customer(app, balance=400, password="correct horse battery")
    with serve(app) as site:
        page = browser.new_page(viewport=WIDTHS["desktop"])
        sign_in(page, site, customer.email)
        page.goto(f"{site}/account")
        banner, card = box(page, "#balance-banner"), box(page, "main .card.narrow")
        assert abs(banner["x"] - card["x"]) <= 1 and abs(banner["width"] - card["width"]) <= 1
        page.close()


def a_second_of_sound(seconds: int = 1) -> bytes:
    """`seconds` of a 440 Hz tone as WAV, for a stand-in speech server whose audio a browser can play."""
    import io
    import math
    import struct
    import wave

    out = io.BytesIO()
    with wave.open(out, "wb") as sound:
        sound.setnchannels(1)
        sound.setsampwidth(2)
        sound.setframerate(24000)
        tone = (int(8000 * math.sin(2 * math.pi * 440 * n / 24000)) for n in range(24000 * seconds))
        sound.writeframes(b"".join(struct.pack("<h", sample) for sample in tone))
    return out.getvalue()


class _TimedWav(FakeUpstream):
    """Three seconds of tone as one WAV; its captioned route times the words over those three seconds."""

    def _timed_chunks(self, body):
        return [(a_second_of_sound(3), 3.0)]


def test_the_playground_marks_each_word_as_it_is_spoken(make_app, browser, database_uri):
    with serve(_TimedWav()) as upstream:
        app = make_app(UPSTREAM_URL=f"{upstream}/v1")
        customer = factories.customer(app, balance=1000, password="correct horse battery")
        with serve(app) as site:
            page = browser.new_page(viewport=WIDTHS["desktop"])
            errors = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            sign_in(page, site, customer.email)
            page.goto(f"{site}/playground")
            page.fill("#input", "Héllo, brave world.")
            page.select_option("#format", "wav")
            expect(page.locator("#highlight")).to_be_checked()
            page.click("#play")
            # One word a second: each is marked in turn, pointing at the text as typed.
            for word in ("Héllo,", "brave", "world."):
                expect(page.locator("#transcript mark")).to_have_text(word, timeout=4000)
            shot(page, "desktop-playground-words", database_uri)
            expect(page.locator("#playground-status")).to_contain_text("Done.")
            expect(page.locator("#transcript")).to_have_text("Héllo, brave world.")
            assert factories.balance(app, customer.team_id) == 1000 - len("Héllo, brave world.")
            assert errors == []
            page.close()


def test_a_visitor_hears_a_voice_on_the_landing_page_with_our_player(make_app, browser):
    with serve(FakeUpstream(chunks=[a_second_of_sound()])) as upstream:
        app = make_app(UPSTREAM_URL=f"{upstream}/v1")
        with serve(app) as site:
            page = browser.new_page(viewport=WIDTHS["phone"])
            errors = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(site)
            heart = page.locator("[data-player]").first
            expect(heart).to_contain_text("Heart")
            expect(heart).to_contain_text("English (United States)")
            expect(heart.locator("audio")).to_be_hidden()  # our player, not the browser's
            play = heart.get_by_role("button", name="Play Heart, English (United States)")
            # From the keyboard: Tab to it, press Space.
            play.focus()
            page.keyboard.press("Space")
            expect(heart.get_by_role("button", name="Pause Heart, English (United States)")).to_be_visible()
            expect(heart.locator("[data-duration]")).to_have_text("0:01")
            # Another voice stops the first; played to its end, its progress is full and it can be played again.
            michael = page.locator("[data-player]").nth(1)
            michael.get_by_role("button").click()
            expect(heart.get_by_role("button", name="Play Heart, English (United States)")).to_be_visible()
            expect(michael.locator("progress")).to_have_js_property("value", 100)
            expect(michael.get_by_role("button", name="Play Michael, English (United States)")).to_be_visible()
            assert errors == []
            page.close()


@pytest.mark.parametrize("width", WIDTHS)
def test_a_customer_limits_a_key_and_rolls_its_secret(app, site, browser, width, database_uri):
    customer = factories.customer(app, balance=1000, password="correct horse battery")
    page = browser.new_context(viewport=WIDTHS[width], has_touch=True, is_mobile=width == "phone").new_page()
    sign_in(page, site, customer.email)
    page.goto(f"{site}/keys")
    page.click("#keys >> text=Settings")
    page.wait_for_url(f"{site}/keys/{customer.key_id}")
    check_page(page, "key", width, database_uri)
    # A limit without its period is refused beside the field, and nothing is saved.
    page.fill("#spend_limit", "300")
    page.click("text=Save controls")
    expect(page.locator(".field.has-error")).to_contain_text("A spending limit needs a period")
    check_page(page, "key-refused", width, database_uri)
    page.select_option("#spend_period", "day")
    page.fill("#allowed_voices", "alloy af_heart")
    page.fill("#allowed_ips", "203.0.113.0/24")
    page.click("text=Save controls")
    expect(page.locator(".flash.success")).to_contain_text("is saved")
    expect(page.locator("#key-state")).to_contain_text("Spent today")
    expect(page.locator("#key-state")).to_contain_text("of 300")
    check_page(page, "key-limited", width, database_uri)
    # Rolled with a day's grace: the new secret once, then both secrets in the list.
    page.select_option("#grace", "86400")
    page.click("button:has-text('Roll the secret')")
    expect(page.locator("h1")).to_contain_text("The new secret of test key")
    secret = page.locator("#new-key").inner_text()
    check_page(page, "key-rolled", width, database_uri)
    page.click("text=Done, I have copied it")
    page.wait_for_url(f"{site}/keys")
    expect(page.locator("#keys")).to_contain_text(f"{secret[:12]}…")
    expect(page.locator("#keys")).to_contain_text(f"{customer.secret[:12]}… until")
    expect(page.locator("#keys")).to_contain_text("0 of 300")
    check_page(page, "keys-limited", width, database_uri)
    page.context.close()


@pytest.mark.parametrize("width", WIDTHS)
def test_billing_with_a_saved_card_automatic_top_up_and_a_failed_one(browser, furnished, width, database_uri):
    """The billing page in each state automatic top-up can be in, at both widths, checked as every page is;
    and it is turned on in the browser."""
    from app.extensions import db
    from app.models import Payment, PaymentKind, PaymentStatus

    app, site, email = furnished
    team_id = _team_id(app, email)
    context = browser.new_context(viewport=WIDTHS[width], has_touch=True, is_mobile=width == "phone")
    page = context.new_page()
    sign_in(page, site, email)
    page.goto(f"{site}/billing")
    expect(page.locator("#card")).to_contain_text("No card is saved")
    expect(page.locator("#automatic button[value=on]")).to_be_disabled()
    check_page(page, "billing-no-card", width, database_uri)
    with app.app_context():
        team = db.session.get(factories.Team, team_id)
        team.stripe_customer_id, team.card_payment_method = "cus_browser", "pm_browser"
        team.card_brand, team.card_last4, team.card_expires = "visa", "4242", "12/2030"
        db.session.commit()
    page.goto(f"{site}/billing")
    page.fill("#below", "1000")
    page.select_option("#pack", "starter")
    page.fill("#monthly_limit", "3")
    page.click("#automatic button[value=on]")
    expect(page.locator(".flash")).to_contain_text("Automatic top-up is on")
    expect(page.locator("#automatic")).to_contain_text("below 1,000 credits, buy the starter pack")
    check_page(page, "billing-automatic-on", width, database_uri)
    with app.app_context():
        team = db.session.get(factories.Team, team_id)
        team.auto_topup_paused = "Your card has insufficient funds."
        db.session.add(
            Payment(
                team_id=team_id,
                bought_by_id=team.auto_topup_by_id,
                kind=PaymentKind.AUTOMATIC,
                idempotency_key="kp-auto-topup-browser",
                pack="starter",
                credits=10_000,
                amount_cents=500,
                currency="usd",
                status=PaymentStatus.FAILED,
                failure="Your card has insufficient funds.",
            )
        )
        db.session.commit()
    page.goto(f"{site}/billing")
    expect(page.locator("#automatic")).to_contain_text("Automatic top-up is paused.")
    expect(page.locator("#payment-kp-auto-topup-browser")).to_contain_text("insufficient funds")
    check_page(page, "billing-automatic-paused", width, database_uri)
    context.close()
