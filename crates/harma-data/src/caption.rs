//! Caption cleaning exactly as HarMA's `pre_caption` (`dataset/utils.py` of
//! <https://github.com/seekerhuang/HarMA>): lower-case; delete `, . ' ! ? " ( ) * # : ; ~`;
//! `-` and `/` become spaces, `<person>` becomes `person`; runs of two or more whitespace
//! characters become one space (a single tab or newline stays, as in the original); strip;
//! keep the first `max_words` space-separated words. An empty result is an error.

/// Characters `pre_caption` deletes.
const DELETED: &[char] = &[
    ',', '.', '\'', '!', '?', '"', '(', ')', '*', '#', ':', ';', '~',
];

/// Clean one caption; `None` when nothing is left (the original raises there).
pub fn clean_caption(caption: &str, max_words: usize) -> Option<String> {
    let lowered: String = caption
        .to_lowercase()
        .chars()
        .filter(|c| !DELETED.contains(c))
        .map(|c| if c == '-' || c == '/' { ' ' } else { c })
        .collect();
    let replaced = lowered.replace("<person>", "person");
    // runs of >= 2 whitespace characters -> one space
    let mut collapsed = String::with_capacity(replaced.len());
    let chars: Vec<char> = replaced.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        if chars[i].is_whitespace() {
            let mut j = i;
            while j < chars.len() && chars[j].is_whitespace() {
                j += 1;
            }
            if j - i >= 2 {
                collapsed.push(' ');
            } else {
                collapsed.push(chars[i]);
            }
            i = j;
        } else {
            collapsed.push(chars[i]);
            i += 1;
        }
    }
    let trimmed = collapsed.trim_end_matches('\n').trim_matches(' ');
    let words: Vec<&str> = trimmed.split(' ').collect();
    let out = if words.len() > max_words {
        words[..max_words].join(" ")
    } else {
        trimmed.to_string()
    };
    (!out.is_empty()).then_some(out)
}
