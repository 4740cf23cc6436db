//! What Facebook's usage headers say about a page's and the app's budgets (GRAPH_API.md, "Rate
//! limits"): read on every answer, not only on throttled ones, because they are how Facebook says
//! a page is nearing its limit before it refuses calls.

use std::time::Duration;

use serde_json::Value;

/// The usage headers of one answer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// `X-Business-Use-Case-Usage`: the largest of `call_count`, `total_time` and
    /// `total_cputime` over the entries, in percent of the page's budget (100: throttled).
    pub page_percent: Option<u32>,
    /// `X-App-Usage`: the same for the app as a whole.
    pub app_percent: Option<u32>,
    /// `estimated_time_to_regain_access` when above zero (Facebook gives it in minutes).
    pub regain: Option<Duration>,
}

const SHARES: [&str; 3] = ["call_count", "total_time", "total_cputime"];

fn largest_share(entry: &Value) -> Option<u32> {
    SHARES
        .iter()
        .filter_map(|name| entry.get(*name)?.as_u64())
        .max()
        .map(|v| u32::try_from(v).unwrap_or(u32::MAX))
}

impl Usage {
    /// Reads the headers' values; a header that is absent or not Facebook's JSON says nothing.
    pub fn from_headers(business: Option<&str>, app: Option<&str>) -> Self {
        let mut usage = Usage::default();
        if let Some(Value::Object(pages)) =
            business.and_then(|text| serde_json::from_str::<Value>(text).ok())
        {
            let entries = pages
                .values()
                .filter_map(Value::as_array)
                .flatten()
                .collect::<Vec<_>>();
            usage.page_percent = entries.iter().filter_map(|e| largest_share(e)).max();
            usage.regain = entries
                .iter()
                .filter_map(|e| e.get("estimated_time_to_regain_access")?.as_u64())
                .max()
                .filter(|minutes| *minutes > 0)
                .map(|minutes| Duration::from_secs(minutes.saturating_mul(60)));
        }
        if let Some(app) = app.and_then(|text| serde_json::from_str::<Value>(text).ok()) {
            usage.app_percent = largest_share(&app);
        }
        usage
    }

    /// Later news over earlier (a batch's items are answered in order), keeping the longest
    /// regain time either asked for.
    pub fn then(self, later: Usage) -> Usage {
        Usage {
            page_percent: later.page_percent.or(self.page_percent),
            app_percent: later.app_percent.or(self.app_percent),
            regain: self.regain.max(later.regain),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_largest_share_and_the_regain_time_are_read() {
        let usage = Usage::from_headers(
            Some(
                r#"{"111":[{"type":"messenger","call_count":40,"total_time":72,"total_cputime":5,
                "estimated_time_to_regain_access":0}]}"#,
            ),
            Some(r#"{"call_count":3,"total_time":9,"total_cputime":1}"#),
        );
        assert_eq!(usage.page_percent, Some(72));
        assert_eq!(usage.app_percent, Some(9));
        assert_eq!(usage.regain, None);

        let throttled = Usage::from_headers(
            Some(
                r#"{"111":[{"type":"messenger","call_count":100,"estimated_time_to_regain_access":3}]}"#,
            ),
            None,
        );
        assert_eq!(throttled.page_percent, Some(100));
        assert_eq!(throttled.regain, Some(Duration::from_secs(180)));
    }

    #[test]
    fn headers_that_are_not_facebooks_json_say_nothing() {
        for text in [
            "",
            "not json",
            "[1,2]",
            r#"{"111":"x"}"#,
            r#"{"111":[{"call_count":"x"}]}"#,
        ] {
            let usage = Usage::from_headers(Some(text), Some(text));
            assert_eq!(usage.page_percent, None, "{text}");
            assert_eq!(usage.app_percent, None, "{text}");
            assert_eq!(usage.regain, None, "{text}");
        }
    }

    #[test]
    fn later_news_wins_and_the_longest_regain_stays() {
        let first = Usage {
            page_percent: Some(90),
            app_percent: Some(10),
            regain: Some(Duration::from_secs(60)),
        };
        let later = Usage {
            page_percent: Some(95),
            app_percent: None,
            regain: None,
        };
        assert_eq!(
            first.then(later),
            Usage {
                page_percent: Some(95),
                app_percent: Some(10),
                regain: Some(Duration::from_secs(60)),
            }
        );
    }
}
