// Copy buttons: <button data-copy="#selector">. Loaded as a file so the CSP needs no inline scripts.
document.querySelectorAll("[data-copy]").forEach((button) => {
  button.addEventListener("click", async () => {
    const text = document.querySelector(button.dataset.copy).textContent.trim();
    try {
      await navigator.clipboard.writeText(text);
      button.textContent = "Copied";
    } catch {
      const range = document.createRange();
      range.selectNodeContents(document.querySelector(button.dataset.copy));
      window.getSelection().removeAllRanges();
      window.getSelection().addRange(range);
      button.textContent = "Selected: press Ctrl+C";
    }
  });
});

// A page shown once (a new key's secret) in answer to a form: the address bar shows the
// harmless page behind it, so a reload or a return visit asks for that, not the form again.
const replaceUrl = document.querySelector("[data-replace-url]");
if (replaceUrl) {
  history.replaceState(null, "", replaceUrl.dataset.replaceUrl);
}

// On a phone the header's links fold behind a Menu button (without JavaScript they simply wrap).
document.documentElement.classList.add("js");
const menu = document.querySelector(".menu-toggle");
if (menu) {
  menu.addEventListener("click", () => {
    const open = menu.getAttribute("aria-expanded") !== "true";
    menu.setAttribute("aria-expanded", String(open));
    document.querySelector("#site-nav").classList.toggle("open", open);
  });
}
