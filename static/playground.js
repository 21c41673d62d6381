// The playground: the cost before you press play, the audio as it streams in, the balance after.
// Loaded as a file so the CSP needs no inline script; posts JSON with the CSRF token in a header.
const form = document.querySelector("#playground");
const TYPES = { mp3: "audio/mpeg", opus: "audio/ogg", aac: "audio/aac", flac: "audio/flac", wav: "audio/wav" };
if (form) {
  const text = form.querySelector("#input");
  const credits = document.querySelector("#cost-credits");
  const status = document.querySelector("#playground-status");
  const button = document.querySelector("#play");
  const player = document.querySelector("#player");
  const highlight = form.querySelector("#highlight");
  const transcript = document.querySelector("#transcript");
  // One credit per character as the API counts them: Unicode code points, not UTF-16 units.
  const showCost = () => { credits.textContent = [...text.value].length.toLocaleString("en-US"); };
  text.addEventListener("input", showCost);
  showCost();

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    button.disabled = true;
    status.textContent = "Synthesising…";
    const format = form.response_format.value;
    const sent = text.value;
    transcript.hidden = true;
    try {
      let timed = highlight.checked;
      let response = await ask(sent, format, timed);
      let problem = response.ok ? null : await failure(response);
      if (timed && problem && problem.error && problem.error.code === "timestamps_unsupported") {
        // Nothing was charged: ask again for the audio alone.
        timed = false;
        response = await ask(sent, format, false);
        problem = response.ok ? null : await failure(response);
      }
      if (problem) {
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
      if (timed) {
        await playWithWords(response, format, sent);
      } else {
        await play(response, format);
      }
      status.textContent = status.textContent.replace("Playing…", "Done.");
    } catch (error) {
      status.textContent = "The audio stopped early: any part not delivered is refunded.";
    } finally {
      button.disabled = false;
    }
  });

  function ask(input, format, timed) {
    const body = { input, voice: form.voice.value, speed: Number(form.speed.value), response_format: format };
    if (timed) {
      // Server-sent events: the audio in pieces, each word's timing with the piece that holds it.
      Object.assign(body, { return_timestamps: true, stream_format: "sse" });
    }
    return fetch(form.action, {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRFToken": form.csrf_token.value },
      body: JSON.stringify(body),
    });
  }

  function failure(response) {
    return response.json().catch(() => ({ detail: `The request failed (${response.status}).` }));
  }

  // The audio as it arrives, and the text with the word being spoken marked as the player reaches it.
  async function playWithWords(response, format, sent) {
    const words = [];
    const letters = Array.from(sent); // char_start and char_end count code points, as credits do
    const audio = await opened(format);
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let pending = "";
    follow(words, letters);
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      pending += decoder.decode(value, { stream: true });
      let end;
      while ((end = pending.indexOf("\n\n")) >= 0) {
        const block = pending.slice(0, end);
        pending = pending.slice(end + 2);
        if (!block.startsWith("data: ")) continue;
        const event = JSON.parse(block.slice(6));
        if (event.type === "speech.audio.timestamps") {
          words.push(...event.words.filter((word) => word.char_start !== null));
        } else if (event.type === "speech.audio.delta") {
          await audio.add(Uint8Array.from(atob(event.audio), (c) => c.charCodeAt(0)));
        } else if (event.type === "error") {
          throw new Error(event.error.message);
        }
      }
    }
    audio.end();
  }

  // Where decoded audio goes: appended as it comes for MP3 (Media Source Extensions), else played whole.
  async function opened(format) {
    if (format === "mp3" && window.MediaSource && MediaSource.isTypeSupported("audio/mpeg")) {
      const source = new MediaSource();
      player.src = URL.createObjectURL(source);
      await new Promise((resolve) => source.addEventListener("sourceopen", resolve, { once: true }));
      const buffer = source.addSourceBuffer("audio/mpeg");
      let started = false;
      return {
        add: async (bytes) => {
          await append(buffer, bytes);
          if (!started) {
            started = true;
            player.play().catch(() => {});
          }
        },
        end: () => source.endOfStream(),
      };
    }
    const parts = [];
    return {
      add: async (bytes) => parts.push(bytes),
      end: () => {
        player.src = URL.createObjectURL(new Blob(parts, { type: TYPES[format] }));
        player.play().catch(() => {});
      },
    };
  }

  // The word whose time the player is in, marked in the text; redrawn only when it changes.
  // A newer request's words take over: the older loop ends at its next frame.
  let following = 0;
  function follow(words, letters) {
    const mine = ++following;
    let shown = -2;
    const draw = () => {
      if (mine !== following) return;
      const now = player.currentTime;
      let at = -1;
      for (let index = 0; index < words.length && words[index].start_time <= now; index += 1) at = index;
      if (player.ended) at = -1;
      if (at !== shown) {
        shown = at;
        transcript.replaceChildren();
        if (at < 0) {
          transcript.append(letters.join(""));
        } else {
          const word = words[at];
          const mark = document.createElement("mark");
          mark.textContent = letters.slice(word.char_start, word.char_end).join("");
          transcript.append(letters.slice(0, word.char_start).join(""), mark, letters.slice(word.char_end).join(""));
        }
      }
      if (!player.ended) requestAnimationFrame(draw);
    };
    transcript.hidden = false;
    requestAnimationFrame(draw);
  }

  // The plain audio as it arrives: MP3 plays while it streams in, other formats once the whole file is in.
  async function play(response, format) {
    const audio = await opened(format);
    const reader = response.body.getReader();
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      await audio.add(value);
    }
    audio.end();
  }

  function append(buffer, chunk) {
    return new Promise((resolve, reject) => {
      buffer.addEventListener("updateend", resolve, { once: true });
      buffer.addEventListener("error", reject, { once: true });
      buffer.appendBuffer(chunk);
    });
  }
}
