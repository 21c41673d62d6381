// The landing page's voice samples: our own player on each voice's <audio> (play and pause,
// progress, time played). Without this script the browser's own controls show instead.
const players = [...document.querySelectorAll("[data-player]")];

const clock = (seconds) =>
  Number.isFinite(seconds)
    ? `${Math.floor(seconds / 60)}:${String(Math.floor(seconds % 60)).padStart(2, "0")}`
    : "–:––";

players.forEach((player) => {
  const audio = player.querySelector("audio");
  const button = player.querySelector("[data-play]");
  const bar = player.querySelector("progress");
  const elapsed = player.querySelector("[data-elapsed]");
  const duration = player.querySelector("[data-duration]");
  const status = player.querySelector("[data-status]");
  audio.controls = false;

  const show = () => {
    const playing = !audio.paused && !audio.ended;
    player.classList.toggle("playing", playing);
    button.setAttribute("aria-label", `${playing ? "Pause" : "Play"} ${player.dataset.name}`);
  };

  button.addEventListener("click", () => {
    if (!audio.paused) {
      audio.pause();
      return;
    }
    // One voice at a time.
    players.forEach((other) => other !== player && other.querySelector("audio").pause());
    status.textContent = "";
    player.classList.add("loading");
    audio.play().catch(() => {
      player.classList.remove("loading");
      status.textContent = "This sample cannot be played just now; try again in a moment.";
    });
  });
  audio.addEventListener("playing", () => player.classList.remove("loading"));
  ["play", "pause", "ended"].forEach((name) => audio.addEventListener(name, show));
  audio.addEventListener("durationchange", () => {
    duration.textContent = clock(audio.duration);
  });
  audio.addEventListener("timeupdate", () => {
    elapsed.textContent = clock(audio.currentTime);
    bar.value = audio.duration ? (100 * audio.currentTime) / audio.duration : 0;
  });
  audio.addEventListener("ended", () => {
    bar.value = 100;
  });
  audio.addEventListener("error", () => {
    player.classList.remove("loading");
    status.textContent = "This sample cannot be played just now; try again in a moment.";
  });
});
