// The playground: the cost before you press play, the audio as it streams in, the balance after.
// Loaded as a file so the CSP needs no inline script; posts JSON with the CSRF token in a header.
const form = document.querySelector("#playground");
if (form) {
  const text = form.querySelector("#input");
  const credits = document.querySelector("#cost-credits");
  const status = document.querySelector("#playground-status");
  const button = document.querySelector("#play");
  const player = document.querySelector("#player");
  // One credit per character as the API counts them: Unicode code points, not UTF-16 units.
  const showCost = () => { credits.textContent = [...text.value].length.toLocaleString("en-US"); };
  text.addEventListener("input", showCost);
  showCost();

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    button.disabled = true;
    status.textContent = "Synthesising…";
    const format = form.response_format.value;
    try {
      const response = await fetch(form.action, {
        method: "POST",
        credentials: "same-origin",
        headers: { "Content-Type": "application/json", "X-CSRFToken": form.csrf_token.value },
        body: JSON.stringify({
          input: text.value,
          voice: form.voice.value,
          speed: Number(form.speed.value),
          response_format: format,
        }),
      });
      if (!response.ok) {
        const problem = await response.json().catch(() => ({ detail: `The request failed (${response.status}).` }));
        status.textContent = problem.detail;
        return;
      }
      // The answer's X-Credits-Remaining is the one balance: every place the page shows it follows.
      const left = response.headers.get("X-Credits-Remaining");
      if (left !== null) {
        document.querySelectorAll("[data-balance]").forEach((shown) => {
          shown.textContent = Number(left).toLocaleString("en-US");
        });
      }
      status.textContent = `Charged ${Number(response.headers.get("X-Credits-Charged")).toLocaleString("en-US")} credits. Playing…`;
      await play(response, format);
      status.textContent = status.textContent.replace("Playing…", "Done.");
    } catch (error) {
      status.textContent = "The audio stopped early: any part not delivered is refunded.";
    } finally {
      button.disabled = false;
    }
  });

  // MP3 plays as it arrives (Media Source Extensions); other formats once the whole file is in.
  async function play(response, format) {
    if (format === "mp3" && window.MediaSource && MediaSource.isTypeSupported("audio/mpeg")) {
      const source = new MediaSource();
      player.src = URL.createObjectURL(source);
      await new Promise((resolve) => source.addEventListener("sourceopen", resolve, { once: true }));
      const buffer = source.addSourceBuffer("audio/mpeg");
      const reader = response.body.getReader();
      let started = false;
      for (;;) {
        const { done, value } = await reader.read();
        if (done) break;
        await append(buffer, value);
        if (!started) {
          started = true;
          player.play().catch(() => {});
        }
      }
      source.endOfStream();
    } else {
      player.src = URL.createObjectURL(await response.blob());
      player.play().catch(() => {});
    }
  }

  function append(buffer, chunk) {
    return new Promise((resolve, reject) => {
      buffer.addEventListener("updateend", resolve, { once: true });
      buffer.addEventListener("error", reject, { once: true });
      buffer.appendBuffer(chunk);
    });
  }
}
