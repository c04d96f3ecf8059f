mod ceiling;
mod run;
