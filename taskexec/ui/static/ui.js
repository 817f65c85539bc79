/* taskexec dashboard: live refresh (Server-Sent Events), the task drawer, confirmations.
   Vendored with the package; no build step, no third-party code. */
(function () {
  "use strict";
  var body = document.body;
  var refreshing = false, again = false;
  body.dataset.refreshes = "0";

  function swapLive(html) {
    var doc = new DOMParser().parseFromString(html, "text/html");
    var fresh = doc.getElementById("live"), old = document.getElementById("live");
    if (fresh && old) { old.replaceWith(fresh); }
    var actions = doc.getElementById("actions"), oldActions = document.getElementById("actions");
    if (actions && oldActions) { oldActions.replaceWith(actions); }
    else if (oldActions && !actions) { oldActions.remove(); }
    body.dataset.refreshes = String(Number(body.dataset.refreshes) + 1);
  }

  function refresh() {
    if (refreshing) { again = true; return; }
    refreshing = true;
    fetch(location.href, {headers: {"X-Fragment": "live"}, credentials: "same-origin"})
      .then(function (r) { return r.ok ? r.text() : null; })
      .then(function (html) { if (html) { swapLive(html); } })
      .catch(function () {})
      .then(function () {
        refreshing = false;
        if (again) { again = false; refresh(); }
      });
  }

  var events = body.dataset.events;
  if (events && window.EventSource) {
    var source = new EventSource(events);
    source.addEventListener("change", refresh);
    /* What changed between the page's render and the stream's opening (or during a
       reconnect) came with no event: read the page once more. */
    source.addEventListener("open", function () { body.dataset.live = "open"; refresh(); });
    window.addEventListener("beforeunload", function () { source.close(); });
  }

  /* ---- task drawer ---- */
  var drawer = document.getElementById("drawer"), drawerBody = document.getElementById("drawer-body");
  function openTask(taskId) {
    var run = body.dataset.run;
    if (!run || !drawer) { return false; }
    fetch("/runs/" + encodeURIComponent(run) + "/tasks/" + encodeURIComponent(taskId),
          {headers: {"X-Fragment": "drawer"}, credentials: "same-origin"})
      .then(function (r) { return r.text(); })
      .then(function (html) {
        drawerBody.innerHTML = html;  /* rendered and escaped by the server's templates */
        drawer.hidden = false;
        drawer.dataset.task = taskId;
      });
    return true;
  }
  function setParam(name, value, toggle) {
    var url = new URL(location.href);
    if (toggle) {
      var values = url.searchParams.getAll(name);
      url.searchParams.delete(name);
      values.filter(function (v) { return v !== value; }).forEach(function (v) { url.searchParams.append(name, v); });
      if (values.indexOf(value) < 0) { url.searchParams.append(name, value); }
    } else { url.searchParams.set(name, value); }
    history.replaceState(null, "", url.toString());
    refresh();
  }

  document.addEventListener("click", function (e) {
    var t = e.target;
    if (!(t instanceof Element)) { return; }
    if (t.closest("[data-close-drawer]")) { drawer.hidden = true; return; }
    var matrix = t.closest("[data-matrix]");
    if (matrix) { e.preventDefault(); setParam("expand", matrix.getAttribute("data-matrix"), true); return; }
    var fold = t.closest("[data-fold]");
    if (fold) { e.preventDefault(); setParam("expand", fold.getAttribute("data-fold"), true); return; }
    var param = t.closest("[data-param]");
    if (param) { e.preventDefault(); setParam(param.getAttribute("data-param"), param.getAttribute("data-value"), false); return; }
    var task = t.closest("[data-task]");
    if (task && !t.closest("form") && openTask(task.getAttribute("data-task"))) { e.preventDefault(); }
  });
  document.addEventListener("keydown", function (e) {
    if (e.key === "Escape" && drawer) { drawer.hidden = true; }
    if (e.key === "Enter" && e.target instanceof Element && e.target.matches("g.node")) { e.target.dispatchEvent(new MouseEvent("click", {bubbles: true})); }
  });

  /* ---- confirmations: every action form asks first ---- */
  document.addEventListener("submit", function (e) {
    var form = e.target;
    var ask = form instanceof HTMLFormElement && form.getAttribute("data-confirm");
    if (ask && !window.confirm(ask)) { e.preventDefault(); }
  });
})();
