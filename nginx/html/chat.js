// Chat panel: one WebSocket to /<backend>/ws/chat on the page's own host and scheme.
// A dropped connection is retried with exponential backoff and jitter, and resumes with
// last_id (the id of the last message shown), so nothing is missed or shown twice.
// Everything from the server is untrusted and rendered as text only.
"use strict";

(function () {
  const BACKOFF_FIRST_MS = 500;
  const BACKOFF_MAX_MS = 10000;
  const MAX_SHOWN = 500;
  // Retrying cannot help after these: the server refused what this client sends or asks for.
  const FINAL_CLOSE_CODES = new Set([1003, 1007, 1008, 1009]);
  const ID = /^(\d+)-(\d+)$/;
  // The server's "printable": no control or format characters, no separators but the space.
  const PRINTABLE = /^(?:[^\p{C}\p{Z}]| )+$/u;

  const joinForm = document.getElementById("chat-join");
  const roomInput = document.getElementById("chat-room");
  const userInput = document.getElementById("chat-user");
  const joinButton = document.getElementById("chat-join-button");
  const state = document.getElementById("chat-state");
  const list = document.getElementById("chat-messages");
  const notice = document.getElementById("chat-notice");
  const form = document.getElementById("chat-form");
  const input = document.getElementById("chat-input");
  const sendButton = document.getElementById("chat-send");

  let session = null; // {room, user} while joined
  let socket = null;
  let lastId = null;
  let failures = 0; // attempts since the server last proved healthy; drives the backoff
  let retryTimer = null;

  function backend() {
    return document.querySelector('input[name="backend"]:checked').value;
  }

  function chatUrl() {
    const scheme = window.location.protocol === "https:" ? "wss:" : "ws:";
    const query = new URLSearchParams({ room: session.room, user: session.user });
    if (lastId !== null) query.set("last_id", lastId);
    return `${scheme}//${window.location.host}/${backend()}/ws/chat?${query}`;
  }

  function setState(name) {
    state.textContent = name;
    state.dataset.state = name;
    input.disabled = session === null;
    sendButton.disabled = name !== "connected";
  }

  function showNotice(text) {
    notice.textContent = text;
    notice.hidden = !text;
  }

  // Stream ids compare as two numbers: as strings, "9-0" would sort after "10-0".
  function isAfter(id, previous) {
    if (previous === null) return true;
    const [, ms, seq] = ID.exec(id).map(Number);
    const [, prevMs, prevSeq] = ID.exec(previous).map(Number);
    return ms > prevMs || (ms === prevMs && seq > prevSeq);
  }

  function element(tag, className, text) {
    const node = document.createElement(tag);
    node.className = className;
    node.textContent = text; // never innerHTML: user data
    return node;
  }

  function show(message) {
    if (typeof message.id !== "string" || !ID.test(message.id) || message.room !== session.room) return;
    // Ids only increase and every client sees the same order, so an id not after the last
    // one shown is a duplicate (say, a message that raced a reconnect).
    if (!isAfter(message.id, lastId)) return;
    lastId = message.id;

    const item = document.createElement("li");
    item.dataset.id = message.id;
    if (message.user === session.user) item.className = "mine";
    const when = new Date(Number.isFinite(message.ts) ? message.ts : Date.now());
    const time = element("time", "time", when.toLocaleTimeString());
    time.dateTime = when.toISOString();
    item.append(
      time,
      element("span", "user", String(message.user)),
      element("span", "via", `via ${message.via}`),
      element("span", "text", String(message.text)),
    );
    const atBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
    list.append(item);
    while (list.childElementCount > MAX_SHOWN) list.firstElementChild.remove();
    if (atBottom) list.scrollTop = list.scrollHeight;
  }

  function receive(event) {
    let message;
    try {
      message = JSON.parse(event.data);
    } catch {
      return;
    }
    if (message === null || typeof message !== "object") return;
    if (message.type === "message") {
      show(message);
    } else if (message.type === "history_end") {
      // A whole round trip worked: a later drop starts the backoff from the beginning.
      failures = 0;
    } else if (message.type === "error") {
      showNotice(`server: ${message.reason}`);
    } // other types: ignored, as the protocol asks
  }

  function connect() {
    clearTimeout(retryTimer);
    retryTimer = null;
    const ws = new WebSocket(chatUrl());
    socket = ws;
    ws.onopen = () => {
      setState("connected");
      showNotice("");
    };
    ws.onmessage = (event) => {
      if (socket === ws) receive(event);
    };
    ws.onclose = (event) => {
      if (socket !== ws) return;
      socket = null;
      if (FINAL_CLOSE_CODES.has(event.code)) {
        leave(`closed by the server: ${event.code} ${event.reason}`);
      } else {
        retryLater(event);
      }
    };
  }

  function retryLater(event) {
    // Equal jitter: the delay doubles per failed attempt up to a cap, and half of it is
    // random, so the clients of a restarted server do not all come back in the same instant.
    const ceiling = Math.min(BACKOFF_MAX_MS, BACKOFF_FIRST_MS * 2 ** failures);
    const delay = ceiling / 2 + (Math.random() * ceiling) / 2;
    failures += 1;
    setState("reconnecting");
    const why = event.reason ? `${event.code} ${event.reason}` : `${event.code}`;
    showNotice(`connection lost (${why}); retrying in ${(delay / 1000).toFixed(1)} s`);
    retryTimer = setTimeout(connect, delay);
  }

  function disconnect() {
    clearTimeout(retryTimer);
    retryTimer = null;
    if (socket) {
      const ws = socket;
      socket = null;
      ws.close(1000);
    }
  }

  function join() {
    session = { room: roomInput.value, user: userInput.value };
    lastId = null;
    failures = 0;
    list.replaceChildren();
    roomInput.disabled = userInput.disabled = true;
    joinButton.textContent = "Leave";
    showNotice("");
    setState("connecting");
    connect();
  }

  function leave(reason) {
    disconnect();
    session = null;
    roomInput.disabled = userInput.disabled = false;
    joinButton.textContent = "Join";
    showNotice(reason || "");
    setState("closed");
  }

  userInput.addEventListener("input", () => {
    userInput.setCustomValidity(
      userInput.value === "" || PRINTABLE.test(userInput.value) ? "" : "no control characters or line breaks",
    );
  });

  joinForm.addEventListener("submit", (event) => {
    event.preventDefault();
    if (session) leave();
    else join();
  });

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    if (!socket || socket.readyState !== WebSocket.OPEN || input.value === "") return;
    socket.send(JSON.stringify({ type: "message", text: input.value }));
    input.value = "";
  });

  // Another backend, same room: both read the same stream, so last_id resumes there too.
  document.querySelectorAll('input[name="backend"]').forEach((radio) =>
    radio.addEventListener("change", () => {
      if (!session) return;
      disconnect();
      failures = 0;
      setState("connecting");
      connect();
    }),
  );

  // Back online: no reason to sit out the rest of a long backoff.
  window.addEventListener("online", () => {
    if (retryTimer !== null) connect();
  });
})();
