// The page of `movierec serve`: search movies, build a history, see what the model recommends and why.
// It talks only to the API of the server that sent it (see docs/serving.md); every text goes in as text.
"use strict";

const RECOMMENDATIONS = 10;
const MATCHES = 8;
const TYPING_PAUSE_MS = 120;

const state = { history: [], genre: "" }; // history: [{movieId, title, year, genres}], oldest first
let searchTimer = 0;
let searchRound = 0; // answers to an older search or recommendation request than the latest are dropped
let resultsRound = 0;

const byId = (id) => document.getElementById(id);

function element(tag, properties = {}, children = []) {
  const node = Object.assign(document.createElement(tag), properties);
  node.append(...children);
  return node;
}

function showMessage(text) {
  const message = byId("message");
  message.textContent = text;
  message.hidden = !text;
}

// One request to the API: the JSON body, or an Error carrying the server's `detail` (every error has one).
async function api(path, options = {}) {
  let response;
  try {
    response = await fetch(path, options);
  } catch {
    throw new Error("The server did not answer. Is `movierec serve` still running?");
  }
  const body = await response.json().catch(() => null);
  if (!response.ok) {
    const detail = body && typeof body.detail === "string" ? body.detail : `the server answered ${response.status}`;
    throw new Error(detail);
  }
  return body;
}

function titleOf(item) {
  return item.title || `movie ${item.movieId}`;
}

function details(item) {
  const parts = [];
  if (item.year) parts.push(String(item.year));
  if (item.genres) parts.push(item.genres.split("|").join(", "));
  return parts.join(" · ");
}

function wholeNumber(text) {
  return /^\d{1,18}$/.test(text.trim()) ? Number(text.trim()) : null;
}

// ------------------------------------------------------------------ search

function scheduleSearch() {
  clearTimeout(searchTimer);
  searchTimer = setTimeout(search, TYPING_PAUSE_MS);
}

async function search() {
  const query = byId("search").value.trim();
  const round = ++searchRound;
  if (!query) {
    showMatches([], "");
    return;
  }
  try {
    const body = await api(`/v1/items?query=${encodeURIComponent(query)}&limit=${MATCHES}`);
    if (round === searchRound) showMatches(body.items, query);
  } catch (error) {
    if (round === searchRound) showMessage(error.message);
  }
}

function matchButton(item) {
  const button = element("button", { type: "button", onclick: () => pick(item) }, [
    element("span", { className: "title", textContent: titleOf(item) }),
    element("span", { className: "meta", textContent: ` ${details(item)}` }),
  ]);
  button.setAttribute("aria-label", `Add ${titleOf(item)} (${details(item)})`);
  return element("li", {}, [button]);
}

function showMatches(items, query) {
  byId("search-results").replaceChildren(...items.map(matchButton));
  const count = items.length === 1 ? "1 matching movie" : `${items.length} matching movies`;
  byId("search-status").textContent = !query ? "" : items.length ? count : `No movie matches “${query}”.`;
}

function moveThroughMatches(event) {
  const matches = [...byId("search-results").querySelectorAll("button")];
  const at = matches.indexOf(document.activeElement);
  if (event.key === "ArrowDown" && matches.length) {
    matches[Math.min(at + 1, matches.length - 1)].focus();
  } else if (event.key === "ArrowUp" && at >= 0) {
    (at === 0 ? byId("search") : matches[at - 1]).focus();
  } else if (event.key === "Escape" && at >= 0) {
    byId("search").focus();
  } else {
    return;
  }
  event.preventDefault();
}

function pick(item) {
  showMessage("");
  if (state.history.some((watched) => watched.movieId === item.movieId)) {
    showMessage(`“${titleOf(item)}” is already in your history.`);
    return;
  }
  state.history.push(item);
  byId("search").value = "";
  showMatches([], "");
  byId("search").focus();
  historyChanged();
}

async function addById(event) {
  event.preventDefault();
  showMessage("");
  const movieId = wholeNumber(byId("movie-id").value);
  if (movieId === null) {
    showMessage("Enter a movieId: a whole number, like 1193.");
    return;
  }
  try {
    pick(await api(`/v1/items/${movieId}`));
    byId("movie-id").value = "";
  } catch (error) {
    showMessage(error.message);
  }
}

async function startFromUser(event) {
  event.preventDefault();
  showMessage("");
  const userId = wholeNumber(byId("user-id").value);
  if (userId === null) {
    showMessage("Enter a userId: a whole number, the id of a user of the dataset.");
    return;
  }
  try {
    const body = await api(`/v1/users/${userId}/history`);
    state.history = body.items;
    historyChanged();
  } catch (error) {
    showMessage(error.message);
  }
}

// ------------------------------------------------------------------ history

function historyButton(action, symbol, label) {
  const button = element("button", { type: "button", textContent: symbol, title: label });
  button.dataset.action = action;
  button.setAttribute("aria-label", label);
  return button;
}

function showHistory() {
  const items = state.history.map((item, index) => {
    const name = titleOf(item);
    const earlier = historyButton("earlier", "↑", `Move ${name} earlier`);
    const later = historyButton("later", "↓", `Move ${name} later`);
    earlier.disabled = index === 0;
    later.disabled = index === state.history.length - 1;
    const row = element("li", {}, [
      element("span", { className: "title", textContent: name }),
      earlier,
      later,
      historyButton("remove", "✕", `Remove ${name}`),
    ]);
    row.dataset.movieId = item.movieId;
    return row;
  });
  byId("history").replaceChildren(...items);
  const count = state.history.length;
  byId("history-count").textContent = count ? `(${count} movie${count === 1 ? "" : "s"})` : "";
}

function focusInHistory(index, ...actions) {
  const row = byId("history").children[index];
  const button = row && actions.map((a) => row.querySelector(`[data-action=${a}]`)).find((b) => b && !b.disabled);
  (button || byId("search")).focus();
}

function onHistoryClick(event) {
  const button = event.target.closest("button[data-action]");
  if (!button) return;
  showMessage("");
  const index = [...byId("history").children].indexOf(button.closest("li"));
  const action = button.dataset.action;
  if (action === "remove") {
    state.history.splice(index, 1);
    historyChanged();
    focusInHistory(Math.min(index, state.history.length - 1), "remove");
    return;
  }
  const target = action === "earlier" ? index - 1 : index + 1;
  const [moved] = state.history.splice(index, 1);
  state.history.splice(target, 0, moved);
  historyChanged();
  focusInHistory(target, action, action === "earlier" ? "later" : "earlier");
}

function historyChanged() {
  showHistory();
  recommend();
}

// ------------------------------------------------------------------ recommendations

function because(why) {
  const name = titleOf(why);
  if (why.scoreDrop === null) return `Because you picked ${name}, your only movie.`;
  if (why.scoreDrop > 0) return `Mostly because of ${name}: without it, the score falls by ${why.scoreDrop.toFixed(3)}.`;
  return "No single movie of your history raises it: leaving any one out does not lower its score.";
}

function card(recommendation) {
  const heading = element("h3", {}, [
    element("span", { className: "rank", textContent: `${recommendation.rank}.` }),
    titleOf(recommendation),
  ]);
  const meta = `${details(recommendation)} · score ${recommendation.score.toFixed(3)}`;
  const item = element("li", { className: "card" }, [
    heading,
    element("p", { className: "meta", textContent: meta }),
    element("p", { className: "why", textContent: because(recommendation.because) }),
  ]);
  item.dataset.movieId = recommendation.movieId;
  return item;
}

function showResults(cards, status) {
  byId("results").replaceChildren(...cards);
  byId("results-status").textContent = status;
}

function summary(body) {
  const count = body.recommendations.length;
  const genre = state.genre ? ` in ${state.genre}` : "";
  let text = count ? `Top ${count}${genre}, best first.` : `No movie${genre} left to recommend.`;
  if (body.unknownMovieIds.length) text += ` Ignored movieIds the model does not know: ${body.unknownMovieIds.join(", ")}.`;
  return text;
}

async function recommend() {
  const round = ++resultsRound;
  const region = byId("results-region");
  if (!state.history.length) {
    showResults([], "Your history is empty: pick at least one movie to get recommendations.");
    return;
  }
  region.setAttribute("aria-busy", "true");
  const request = {
    history: state.history.map((item) => item.movieId),
    k: RECOMMENDATIONS,
    genre: state.genre || null,
  };
  try {
    const body = await api("/v1/recommendations/explained", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(request),
    });
    if (round === resultsRound) showResults(body.recommendations.map(card), summary(body));
  } catch (error) {
    if (round === resultsRound) {
      showResults([], "No recommendations: see the message above.");
      showMessage(error.message);
    }
  } finally {
    if (round === resultsRound) region.setAttribute("aria-busy", "false");
  }
}

// ------------------------------------------------------------------ start

async function describeModel() {
  try {
    const [health, genres] = await Promise.all([api("/health"), api("/v1/genres")]);
    byId("model-info").textContent =
      `Model: ${health.model}, trained on ${health.dataset || "a dataset"} (${health.num_items} movies, ` +
      `${health.num_users} users). Pick movies you watched, oldest first; it recommends what to watch next.`;
    byId("genre").append(...genres.genres.map((name) => element("option", { value: name, textContent: name })));
  } catch (error) {
    showMessage(error.message);
  }
}

function start() {
  byId("search").addEventListener("input", scheduleSearch);
  byId("search-form").addEventListener("submit", (event) => event.preventDefault());
  byId("search-form").addEventListener("keydown", moveThroughMatches);
  byId("search-results").addEventListener("keydown", moveThroughMatches);
  byId("movie-form").addEventListener("submit", addById);
  byId("user-form").addEventListener("submit", startFromUser);
  byId("history").addEventListener("click", onHistoryClick);
  byId("clear-history").addEventListener("click", () => {
    showMessage("");
    state.history = [];
    historyChanged();
  });
  byId("genre").addEventListener("change", (event) => {
    state.genre = event.target.value;
    recommend();
  });
  showHistory();
  describeModel();
}

document.addEventListener("DOMContentLoaded", start);
