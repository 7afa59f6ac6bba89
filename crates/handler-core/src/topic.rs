//! AMQP topic matching (spec §2.4): words separated by `.`, `*` matches exactly one word,
//! `#` matches zero or more words. Used to route untargeted events to subscribed sessions,
//! and to decide which patterns a client may subscribe to (`pattern_covers`).

/// Whether `topic` matches the AMQP topic `pattern`.
pub fn topic_matches(pattern: &str, topic: &str) -> bool {
    let p: Vec<&str> = pattern.split('.').collect();
    let t: Vec<&str> = topic.split('.').collect();
    matches_words(&p, &t)
}

/// A topic pattern split into words once, for matching many topics against it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicPattern {
    text: String,
    words: Vec<String>,
}

impl TopicPattern {
    /// Splits `text` at `.`; any text is accepted (patterns are checked where clients send
    /// them).
    pub fn new(text: &str) -> Self {
        TopicPattern { text: text.to_owned(), words: text.split('.').map(str::to_owned).collect() }
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether the topic, already split into words, matches.
    pub fn matches(&self, topic_words: &[&str]) -> bool {
        matches_words(&self.words, topic_words)
    }
}

/// Whether every topic matched by `inner` is also matched by `outer` (both AMQP topic
/// patterns). Dynamic programming over word positions, so it is linear in the product of
/// the lengths whatever the wildcards.
pub fn pattern_covers(outer: &str, inner: &str) -> bool {
    let a: Vec<&str> = outer.split('.').collect();
    let p: Vec<&str> = inner.split('.').collect();
    // covers[i][j]: outer[i..] covers inner[j..].
    let mut covers = vec![vec![false; p.len() + 1]; a.len() + 1];
    covers[a.len()][p.len()] = true;
    for i in (0..a.len()).rev() {
        for j in (0..=p.len()).rev() {
            covers[i][j] = if a[i] == "#" {
                // `#` takes nothing, or swallows inner's next word (whatever it is).
                covers[i + 1][j] || (j < p.len() && covers[i][j + 1])
            } else if j == p.len() || p[j] == "#" {
                // Inner can still match a topic here that a non-`#` word cannot.
                false
            } else if a[i] == "*" || a[i] == p[j] {
                // `*` covers one literal word or `*`; a literal covers only itself.
                covers[i + 1][j + 1]
            } else {
                false
            };
        }
    }
    covers[0][0]
}

fn matches_words<S: AsRef<str>>(p: &[S], t: &[&str]) -> bool {
    // Iterative with backtracking over the last `#`, so hostile patterns cannot recurse
    // deeply (patterns are bounded in length by the client limits anyway).
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi].as_ref() == "#" {
            star = Some((pi, ti));
            pi += 1;
        } else if pi < p.len() && (p[pi].as_ref() == "*" || p[pi].as_ref() == t[ti]) {
            pi += 1;
            ti += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi].as_ref() == "#" {
        pi += 1;
    }
    pi == p.len()
}

#[cfg(test)]
mod tests {
    use super::{TopicPattern, pattern_covers, topic_matches};

    #[test]
    fn amqp_topic_rules() {
        for (pattern, topic, expected) in [
            ("capture.*.broadcast", "capture.anything.broadcast", true),
            ("capture.*.broadcast", "capture.a.b.broadcast", false),
            ("capture.svc.#", "capture.svc.ping", true),
            ("capture.svc.#", "capture.svc", true),
            ("capture.svc.#", "capture.svc.a.b.c", true),
            ("#", "anything.at.all", true),
            ("#", "", true),
            ("*", "one", true),
            ("*", "one.two", false),
            ("a.#.z", "a.z", true),
            ("a.#.z", "a.b.c.z", true),
            ("a.#.z", "a.b.c.y", false),
            ("a.b", "a.b", true),
            ("a.b", "a.c", false),
            ("#.end", "x.y.end", true),
            ("#.#", "x", true),
        ] {
            assert_eq!(topic_matches(pattern, topic), expected, "{pattern} vs {topic}");
            let words: Vec<&str> = topic.split('.').collect();
            assert_eq!(
                TopicPattern::new(pattern).matches(&words),
                expected,
                "{pattern} vs {topic}"
            );
        }
    }

    #[test]
    fn pattern_coverage() {
        for (outer, inner, expected) in [
            ("#", "anything.*.#", true),
            ("news.#", "news.sport", true),
            ("news.#", "news.*", true),
            ("news.#", "news.#", true),
            ("news.#", "news", true),
            ("news.#", "#", false),
            ("news.#", "*.sport", false),
            ("news.*", "news.sport", true),
            ("news.*", "news.*", true),
            ("news.*", "news.#", false),
            ("news.*", "news.a.b", false),
            ("users.alice.notify", "users.alice.notify", true),
            ("users.alice.notify", "users.*.notify", false),
            ("users.alice.#", "users.bob.#", false),
            ("*.b", "a.b", true),
            ("*.b", "#.b", false),
            ("a.#.z", "a.b.*.z", true),
            ("a.#.z", "a.#.z", true),
            ("a.#.z", "a.#", false),
            ("#.#", "x.#", true),
        ] {
            assert_eq!(pattern_covers(outer, inner), expected, "{outer} covers {inner}");
        }
    }
}
