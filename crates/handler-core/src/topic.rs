//! AMQP topic matching (spec §2.4): words separated by `.`, `*` matches exactly one word,
//! `#` matches zero or more words. Used to route untargeted events to subscribed sessions.

/// Whether `topic` matches the AMQP topic `pattern`.
pub fn topic_matches(pattern: &str, topic: &str) -> bool {
    let p: Vec<&str> = pattern.split('.').collect();
    let t: Vec<&str> = topic.split('.').collect();
    matches_words(&p, &t)
}

fn matches_words(p: &[&str], t: &[&str]) -> bool {
    // Iterative with backtracking over the last `#`, so hostile patterns cannot recurse
    // deeply (patterns are bounded in length by the client limits anyway).
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] == "#" {
            star = Some((pi, ti));
            pi += 1;
        } else if pi < p.len() && (p[pi] == "*" || p[pi] == t[ti]) {
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
    while pi < p.len() && p[pi] == "#" {
        pi += 1;
    }
    pi == p.len()
}

#[cfg(test)]
mod tests {
    use super::topic_matches;

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
        }
    }
}
