// Chat panel: sign in with a display name (a token from POST /auth/token), then one
// WebSocket to /<backend>/ws/chat on the page's own host and scheme, the token offered as a
// subprotocol. A dropped connection is retried with full-jitter backoff and resumes with
// last_id and epoch, so nothing is shown twice and a gap the server could not fill is said
// out loud. Everything from the server is untrusted and rendered as text only.
"use strict";

(function () {
  const SUBPROTOCOL = "wsstack.chat.v1";
  // One key for every tab of this browser: they share one token, so one user id, so the
  // room counts them as one member.
  const STORAGE_KEY = "wsstack.chat.identity";
  // Until a history_end brings the server's own window (CHAT_RECONNECT_WINDOW_MS).
  const DEFAULT_RECONNECT_WINDOW_MS = 5000;
  const MAX_RECONNECT_WINDOW_MS = 60000; // the hint is untrusted input too
  const BACKOFF_BASE_MS = 500;
  const BACKOFF_MAX_MS = 10000;
  // Renew this long before expiry (or a fifth of what is left, for short tokens), so a
  // reconnect never has to wait for the issuer.
  const RENEW_BEFORE_S = 60;
  // A token this close to expiry is renewed before it is offered: it would be refused, or
  // closed with 4001 moments later.
  const EXPIRY_MARGIN_S = 5;
  const RENEW_RETRY_MS = 10000;
  // nginx rate-limits the issuer per address (429): wait a little, then give up.
  const TOKEN_RETRY_MS = 2000;
  const TOKEN_RETRY_FOR_MS = 30000;
  // A browser cannot see why a handshake failed (a 401 looks like any lost connection,
  // close 1006). After this many failures in a row the token is renewed once, in case the
  // server no longer accepts it (say, its secret changed) though the clock says it is valid.
  const HANDSHAKE_FAILURES_BEFORE_RENEWAL = 3;
  const MAX_SHOWN = 500;
  const MAX_MEMBERS_SHOWN = 100;
  // Retrying cannot help after these: the server refused what this client sends or asks for.
  const FINAL_CLOSE_CODES = new Set([1003, 1007, 1008, 1009]);
  const TOKEN_EXPIRED = 4001;
  const BACKPLANE_OR_TOO_SLOW = 1013;
  const ID = /^(\d+)-(\d+)$/;
  const EPOCH = /^[0-9a-f]{1,32}$/;
  // The server's "printable": no control or format characters, no separators but the space.
  const PRINTABLE = /^(?:[^\p{C}\p{Z}]| )+$/u;

  const signinForm = document.getElementById("chat-signin");
  const nameInput = document.getElementById("chat-name");
  const me = document.getElementById("chat-me");
  const signinButton = document.getElementById("chat-signin-button");
  const joinForm = document.getElementById("chat-join");
  const roomInput = document.getElementById("chat-room");
  const joinButton = document.getElementById("chat-join-button");
  const state = document.getElementById("chat-state");
  const presence = document.getElementById("chat-presence");
  const count = document.getElementById("chat-count");
  const memberList = document.getElementById("chat-members");
  const more = document.getElementById("chat-members-more");
  const recovery = document.getElementById("chat-recovery");
  const list = document.getElementById("chat-messages");
  const notice = document.getElementById("chat-notice");
  const form = document.getElementById("chat-form");
  const input = document.getElementById("chat-input");
  const sendButton = document.getElementById("chat-send");

  let identity = null; // {token, expires_at, user: {id, name}} while signed in
  let signingIn = false;
  let renewing = null; // the renewal under way, shared by everyone who needs it
  let renewTimer = null;
  let renewAt = 0; // Date.now() when the token is due for renewal
  let forceRenewal = false;
  let session = null; // {room} while joined
  let socket = null;
  let attempt = 0; // bumped by every connect and disconnect: a stale async step sees it changed
  let lastId = null;
  let epoch = null;
  let synced = false; // a history_end arrived since the join: the page has the room up to lastId
  let reconnectWindowMs = DEFAULT_RECONNECT_WINDOW_MS;
  let failures = 0; // attempts since the server last proved healthy; drives the backoff
  let handshakeFailures = 0;
  let expiredInARow = 0; // 4001s with no history_end between them
  let retryTimer = null;
  const members = new Map(); // id -> name, from the presence snapshot and join/leave events
  let unlisted = 0; // present but beyond the snapshot's cap

  class TokenError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status; // 400: the issuer refused (sign in again); anything else: try later
    }
  }

  function nowSeconds() {
    return Date.now() / 1000;
  }

  function validIdentity(value) {
    return (
      value !== null &&
      typeof value === "object" &&
      typeof value.token === "string" &&
      value.token !== "" &&
      Number.isFinite(value.expires_at) &&
      value.user !== null &&
      typeof value.user === "object" &&
      typeof value.user.id === "string" &&
      typeof value.user.name === "string"
    );
  }

  function storedIdentity() {
    try {
      const value = JSON.parse(window.localStorage.getItem(STORAGE_KEY));
      return validIdentity(value) ? value : null;
    } catch {
      return null; // storage disabled, or a value this page did not write
    }
  }

  function store(value) {
    try {
      if (value) window.localStorage.setItem(STORAGE_KEY, JSON.stringify(value));
      else window.localStorage.removeItem(STORAGE_KEY);
    } catch {
      // Storage disabled: this tab still works, on its own.
    }
  }

  function expiresWithin(value, seconds) {
    return value.expires_at - nowSeconds() < seconds;
  }

  function sleep(ms) {
    return new Promise((resolve) => setTimeout(resolve, ms));
  }

  async function requestToken(name, previous) {
    const headers = { "Content-Type": "application/json" };
    // The same user id again: the other tabs, and the room's presence, keep knowing us.
    if (previous) headers.Authorization = `Bearer ${previous}`;
    const giveUpAt = Date.now() + TOKEN_RETRY_FOR_MS;
    for (;;) {
      let response;
      try {
        response = await fetch("/auth/token", {
          method: "POST",
          headers,
          body: JSON.stringify({ name }),
          cache: "no-store",
        });
      } catch {
        throw new TokenError(0, "the token issuer cannot be reached");
      }
      if (response.status === 429 && Date.now() < giveUpAt) {
        await sleep(TOKEN_RETRY_MS);
        continue;
      }
      if (!response.ok) {
        const reason = (await response.text().catch(() => "")).trim();
        throw new TokenError(response.status, `${response.status} ${reason}`.trim());
      }
      let document_;
      try {
        document_ = await response.json();
      } catch {
        document_ = null;
      }
      if (!validIdentity(document_)) throw new TokenError(0, "the token issuer sent something else");
      return { token: document_.token, expires_at: document_.expires_at, user: document_.user };
    }
  }

  // Another tab may have renewed (or signed in as someone else) meanwhile: the newest wins.
  function setIdentity(value, save) {
    identity = value;
    if (save) store(value);
    scheduleRenewal();
    render();
  }

  function renew(force) {
    if (renewing) return renewing;
    renewing = (async () => {
      const stored = storedIdentity();
      if (!force && stored && identity && stored.user.id === identity.user.id && stored.expires_at > identity.expires_at) {
        setIdentity(stored, false);
        return; // another tab renewed it already
      }
      if (!identity) throw new TokenError(400, "signed out");
      const before = identity;
      const next = await requestToken(before.user.name, before.token);
      // Signed out, or signed in as someone else, while the request was out: keep that.
      if (identity && identity.user.id === before.user.id) setIdentity(next, true);
    })().finally(() => {
      renewing = null;
    });
    return renewing;
  }

  function scheduleRenewal() {
    clearTimeout(renewTimer);
    renewTimer = null;
    if (!identity) return;
    const left = identity.expires_at - nowSeconds();
    const lead = Math.min(RENEW_BEFORE_S, Math.max(EXPIRY_MARGIN_S, left / 5));
    armRenewal(Date.now() + Math.max(0, (left - lead) * 1000));
  }

  function armRenewal(at) {
    renewAt = at;
    clearTimeout(renewTimer);
    // setTimeout keeps at most 2^31-1 ms (a token from elsewhere may live longer): a timer
    // that fires before renewAt only sets itself again.
    renewTimer = setTimeout(renewNow, Math.min(Math.max(0, at - Date.now()), 2 ** 31 - 1));
  }

  function renewNow() {
    if (Date.now() < renewAt) {
      armRenewal(renewAt);
      return;
    }
    renew(false).then(scheduleRenewal, (error) => {
      if (error.status === 400) signOut("your sign-in can no longer be renewed: sign in again");
      else if (identity) armRenewal(Date.now() + RENEW_RETRY_MS);
    });
  }

  function backend() {
    return document.querySelector('input[name="backend"]:checked').value;
  }

  function chatUrl() {
    const scheme = window.location.protocol === "https:" ? "wss:" : "ws:";
    const query = new URLSearchParams({ room: session.room });
    // After a history_end the page has the room up to lastId, or up to nothing at all ("0-0":
    // the room was empty): either way a resume, so the server can say whether it is complete.
    const resumeFrom = lastId !== null ? lastId : synced ? "0-0" : null;
    if (resumeFrom !== null) {
      query.set("last_id", resumeFrom);
      if (epoch !== null) query.set("epoch", epoch);
    }
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

  function render() {
    const signedIn = identity !== null;
    nameInput.hidden = signedIn;
    nameInput.required = !signedIn;
    me.hidden = !signedIn;
    me.textContent = signedIn ? `Signed in as ${identity.user.name}` : "";
    signinButton.textContent = signedIn ? "Sign out" : "Sign in";
    signinButton.disabled = signingIn;
    roomInput.disabled = !signedIn || session !== null;
    joinButton.disabled = !signedIn;
    joinButton.textContent = session ? "Leave" : "Join";
    presence.hidden = session === null;
    renderMembers();
  }

  function renderMembers() {
    const total = members.size + unlisted;
    count.textContent = `${total} in the room`;
    const mine = identity ? identity.user.id : null;
    const shown = [...members]
      .sort(([idA, nameA], [idB, nameB]) => nameA.localeCompare(nameB) || (idA < idB ? -1 : idA > idB ? 1 : 0))
      .slice(0, MAX_MEMBERS_SHOWN)
      .map(([id, name]) => {
        const item = element("li", id === mine ? "member me" : "member", name);
        item.dataset.id = id;
        return item;
      });
    memberList.replaceChildren(...shown);
    more.textContent = total > shown.length ? `and ${total - shown.length} more` : "";
    more.hidden = total <= shown.length;
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
    if (typeof message.uid === "string") item.dataset.uid = message.uid;
    markMine(item);
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

  // By user id: display names are not unique, anyone may sign in as "ada".
  function markMine(item) {
    item.classList.toggle("mine", identity !== null && item.dataset.uid === identity.user.id);
  }

  function historyEnd(message) {
    // A whole round trip worked: a later drop starts the backoff from the beginning.
    failures = 0;
    handshakeFailures = 0;
    expiredInARow = 0;
    synced = true;
    if (typeof message.epoch === "string" && EPOCH.test(message.epoch)) epoch = message.epoch;
    const hint = message.reconnect_window_ms;
    if (Number.isFinite(hint) && hint >= 0) reconnectWindowMs = Math.min(hint, MAX_RECONNECT_WINDOW_MS);
    if (message.recovered === false) {
      // The server could not send everything after lastId (trimmed, recreated, or too much
      // missed): what follows is right, but something before it is gone.
      recovery.textContent =
        "Some messages could not be recovered: while this page was away the room lost part of its history.";
      recovery.hidden = false;
    }
  }

  function applyPresence(message) {
    if (message.room !== session.room || !Array.isArray(message.members)) return;
    members.clear();
    for (const member of message.members) {
      if (member && typeof member.id === "string" && typeof member.name === "string") members.set(member.id, member.name);
    }
    unlisted = Number.isInteger(message.count) ? Math.max(0, message.count - members.size) : 0;
    renderMembers();
  }

  // Events may repeat what the snapshot already has (one's own join often arrives after
  // it): a set add or remove is the same whether it comes once or twice.
  function applyMemberEvent(message) {
    const user = message.user;
    if (message.room !== session.room || !user || typeof user.id !== "string") return;
    if (message.type === "join") members.set(user.id, String(user.name));
    else members.delete(user.id);
    renderMembers();
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
      historyEnd(message);
    } else if (message.type === "presence") {
      applyPresence(message);
    } else if (message.type === "join" || message.type === "leave") {
      applyMemberEvent(message);
    } else if (message.type === "error") {
      showNotice(`server: ${message.reason}`);
    } // other types: ignored, as the protocol asks
  }

  async function connect() {
    clearTimeout(retryTimer);
    retryTimer = null;
    if (!session || !identity) return;
    const mine = ++attempt;
    if (forceRenewal || expiresWithin(identity, EXPIRY_MARGIN_S)) {
      try {
        await renew(forceRenewal);
        forceRenewal = false;
      } catch (error) {
        if (mine !== attempt) return;
        if (error.status === 400) signOut("your sign-in can no longer be renewed: sign in again");
        else retryLater({ code: 0, reason: `no token: ${error.message}` });
        return;
      }
      if (mine !== attempt) return; // left, or another connect took over, meanwhile
    }
    const token = identity.token;
    const ws = new WebSocket(chatUrl(), [SUBPROTOCOL, `bearer.${token}`]);
    let opened = false;
    socket = ws;
    ws.onopen = () => {
      opened = true;
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
      } else if (event.code === TOKEN_EXPIRED) {
        if (identity.token === token) forceRenewal = true;
        expiredInARow += 1;
        if (expiredInARow === 1) {
          // Not a failure: the token ran out. A renewed one (ours may already be) and straight back.
          setState("reconnecting");
          showNotice("token expired: renewing it and reconnecting");
          retryTimer = setTimeout(connect, 0);
        } else {
          // Even a fresh token expired at once (the server's clock is far ahead of the
          // issuer's?): back off rather than loop on the issuer.
          retryLater(event);
        }
      } else {
        if (!opened) {
          handshakeFailures += 1;
          if (handshakeFailures === HANDSHAKE_FAILURES_BEFORE_RENEWAL) forceRenewal = true;
        }
        retryLater(event);
      }
    };
  }

  function retryLater(event) {
    // Full jitter: a delay anywhere from 0 to the ceiling, so the clients of a stopped server
    // spread evenly over the window instead of arriving together. The first retry after a
    // stop (1001) or a lost connection spreads over the server's window; after that, and
    // after a 1013 (a backplane outage or a slow reader: no crowd to spread), the ceiling
    // doubles per failed attempt up to a cap.
    const ceiling =
      failures === 0 && event.code !== BACKPLANE_OR_TOO_SLOW
        ? reconnectWindowMs
        : Math.min(BACKOFF_MAX_MS, BACKOFF_BASE_MS * 2 ** failures);
    const delay = Math.random() * ceiling;
    failures += 1;
    setState("reconnecting");
    const why = event.reason ? `${event.code} ${event.reason}` : `${event.code}`;
    showNotice(`connection lost (${why}); retrying in ${(delay / 1000).toFixed(1)} s`);
    retryTimer = setTimeout(connect, delay);
  }

  function disconnect() {
    clearTimeout(retryTimer);
    retryTimer = null;
    attempt += 1;
    if (socket) {
      const ws = socket;
      socket = null;
      ws.close(1000);
    }
  }

  function join() {
    session = { room: roomInput.value };
    lastId = null;
    epoch = null;
    synced = false;
    failures = 0;
    handshakeFailures = 0;
    expiredInARow = 0;
    members.clear();
    unlisted = 0;
    list.replaceChildren();
    recovery.hidden = true;
    showNotice("");
    render();
    setState("connecting");
    connect();
  }

  function leave(reason) {
    disconnect();
    session = null;
    members.clear();
    unlisted = 0;
    showNotice(reason || "");
    render();
    setState("closed");
  }

  function signOut(reason) {
    if (session) leave(reason);
    else showNotice(reason || "");
    setIdentity(null, true);
  }

  async function signIn(name) {
    signingIn = true;
    render();
    showNotice("");
    try {
      setIdentity(await requestToken(name, null), true);
    } catch (error) {
      showNotice(`sign-in failed: ${error.message}`);
    } finally {
      signingIn = false;
      render();
    }
  }

  nameInput.addEventListener("input", () => {
    nameInput.setCustomValidity(
      nameInput.value === "" || PRINTABLE.test(nameInput.value) ? "" : "no control characters or line breaks",
    );
  });

  signinForm.addEventListener("submit", (event) => {
    event.preventDefault();
    if (identity) signOut();
    else if (!signingIn) signIn(nameInput.value);
  });

  joinForm.addEventListener("submit", (event) => {
    event.preventDefault();
    if (session) leave();
    else if (identity) join();
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

  // Another tab of this browser signed in, renewed or signed out (only other tabs get this event).
  window.addEventListener("storage", (event) => {
    if (event.key !== STORAGE_KEY && event.key !== null) return;
    const next = storedIdentity();
    if (next === null) {
      if (identity) signOut("signed out in another tab");
      return;
    }
    const sameUser = identity !== null && identity.user.id === next.user.id;
    if (sameUser && next.expires_at <= identity.expires_at) return;
    setIdentity(next, false);
    if (!sameUser && session) {
      // One browser, one member: follow the other tab's sign-in, keeping our place in the room.
      for (const item of list.children) markMine(item);
      disconnect();
      failures = 0;
      setState("connecting");
      connect();
    }
  });

  const saved = storedIdentity();
  if (saved) setIdentity(saved, false);
  else render();
})();
