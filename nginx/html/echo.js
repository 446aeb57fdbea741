// Echo panel: one WebSocket to the chosen backend, opened on the page's own host and
// scheme (ws:// for http://, wss:// for https://). Messages are shown as text only.
"use strict";

(function () {
  const form = document.getElementById("echo-form");
  const input = document.getElementById("echo-input");
  const sendButton = document.getElementById("echo-send");
  const state = document.getElementById("echo-state");
  const log = document.getElementById("echo-log");
  const radios = document.querySelectorAll('input[name="backend"]');
  let socket = null;

  function backend() {
    return document.querySelector('input[name="backend"]:checked').value;
  }

  function echoUrl(name) {
    const scheme = window.location.protocol === "https:" ? "wss:" : "ws:";
    return `${scheme}//${window.location.host}/${name}/ws/echo`;
  }

  function setState(name) {
    state.textContent = name;
    state.dataset.state = name;
    const open = name === "open";
    input.disabled = !open;
    sendButton.disabled = !open;
  }

  function addLine(direction, text) {
    const item = document.createElement("li");
    item.className = direction;
    item.textContent = text; // never innerHTML: messages are untrusted
    log.prepend(item);
  }

  function connect() {
    if (socket) {
      socket.onclose = null;
      socket.close(1000);
    }
    const name = backend();
    setState("connecting");
    socket = new WebSocket(echoUrl(name));
    socket.onopen = () => setState("open");
    socket.onmessage = (event) => addLine("received", `${name} ← ${event.data}`);
    socket.onclose = () => setState("closed");
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    if (!socket || socket.readyState !== WebSocket.OPEN || input.value === "") return;
    socket.send(input.value);
    addLine("sent", `${backend()} → ${input.value}`);
    input.value = "";
  });
  radios.forEach((radio) => radio.addEventListener("change", connect));
  connect();
})();
